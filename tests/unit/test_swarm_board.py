"""The swarm board: one listing per tick for every waiter, and what a waiter concludes from it.

The engine here is a small stand-in for ``DockerClient.api`` (services and tasks, as the
manager lists them); the board against a real swarm is tested in tests/integration/test_swarm*.py.
"""

from __future__ import annotations

import threading
from datetime import UTC
from types import SimpleNamespace

from runtime.backends import swarm_board
from runtime.backends.swarm_board import Board, Ended, Placed, Snapshot, Unplaceable, ended, placed
from tests.support import wait_until

SID = "0123456789ab"


def task(state: str, node: str | None = "node-a", code: int | None = None, err: str = "", at: str = "2026") -> dict:
    status = {"State": state, "Err": err}
    if code is not None:
        status["ContainerStatus"] = {"ExitCode": code}
    return {"ServiceID": SID + "cdef0123", "NodeID": node, "Status": status, "CreatedAt": at}


def snap(*tasks: dict, listed: bool = True) -> Snapshot:
    return Snapshot(1, frozenset({SID} if listed else ()), {SID: t for t in tasks})  # noqa: B035 - the last task listed wins


def up(_node):
    return False


def down(node):
    return node == "node-a"


def test_a_running_worker_has_not_ended_and_an_exited_one_has_its_code():
    assert ended(SID, snap(task("running")), up) is None
    assert ended(SID, snap(), up) is None, "no task yet: still on its way"
    assert ended(SID, snap(task("complete", code=0)), up) == Ended(0, "exited")
    assert ended(SID, snap(task("failed", code=137)), up) == Ended(137, "exited")


def test_a_removed_service_or_a_down_node_ends_the_worker():
    assert ended(SID, snap(task("running"), listed=False), up) == Ended(-1, "removed")
    assert ended(SID, snap(task("running")), down) == Ended(-1, "node_down")


def test_placement_is_running_a_rejection_or_nothing_yet():
    assert placed(SID, snap(task("running")), up) == Placed("node-a")
    assert placed(SID, snap(task("assigned")), up) is None
    assert placed(SID, snap(), up) is None
    assert isinstance(placed(SID, snap(task("rejected", err="No such image")), up), Unplaceable)
    assert "no suitable node" in placed(SID, snap(task("pending", node=None, err="no suitable node (x)")), up).reason
    assert "went down" in placed(SID, snap(task("assigned")), down).reason
    assert isinstance(placed(SID, snap(task("running"), listed=False), up), Unplaceable)


class Api:
    """What ``DockerClient.api`` lists; ``hold`` blocks a listing until released."""

    def __init__(self) -> None:
        self.services_listed, self.tasks_listed = [], []
        self.calls = 0
        self.hold = threading.Event()
        self.hold.set()
        self.begun = threading.Event()

    def services(self, filters):
        self.calls += 1
        listed = [{"ID": sid} for sid in self.services_listed]  # as the manager saw them when asked
        self.begun.set()
        self.hold.wait(5)
        return listed

    def tasks(self):
        return list(self.tasks_listed)


def board_of(api: Api, failures: int = 0) -> Board:
    """A board on ``api``; its first ``failures`` engines cannot be made (manager unreachable)."""
    left = [failures]

    def engine():
        if left[0]:
            left[0] -= 1
            raise OSError("connection refused")
        return SimpleNamespace(api=api, close=lambda: None)

    return Board(engine)


def test_many_waiters_share_each_listing(monkeypatch):
    monkeypatch.setattr(swarm_board, "POLL_S", 0.05)
    api = Api()
    api.services_listed, api.tasks_listed = [SID + "cdef"], [task("running")]
    board = board_of(api)
    results: list = []
    waiters = [threading.Thread(target=lambda: results.append(board.wait(lambda s: ended(SID, s, up), timeout=10)),
                                daemon=True) for _ in range(50)]
    for w in waiters:
        w.start()
    wait_until(lambda: board._waiters == 50 and api.calls >= 3, 5, "several listings, all 50 watching", 0.005)
    listings = api.calls
    api.tasks_listed = [task("complete", code=0)]
    for w in waiters:
        w.join(5)
    assert results == [Ended(0, "exited")] * 50
    assert api.calls - listings < 10, "50 waiters, a few listings: not one per waiter"


def test_a_listing_begun_before_a_waiter_came_is_not_its_answer(monkeypatch):
    """A service created while a listing was under way is missing from it: read as
    'removed', the pool would throw away a worker that had just started."""
    monkeypatch.setattr(swarm_board, "POLL_S", 0.01)
    api = Api()
    api.hold.clear()  # every listing waits for the test
    board = board_of(api)
    keeper = threading.Thread(target=lambda: board.wait(lambda s: None, timeout=5), daemon=True)
    keeper.start()
    api.begun.wait(5)  # a listing is under way, without the service
    seen: list = []
    waiter = threading.Thread(target=lambda: seen.append(board.wait(lambda s: ended(SID, s, up), timeout=2)), daemon=True)
    waiter.start()
    wait_until(lambda: board._waiters == 2, 5, "the waiter, come while the listing is under way", 0.005)
    api.services_listed, api.tasks_listed = [SID + "cdef"], [task("running")]  # created now
    api.hold.set()
    waiter.join(5)
    keeper.join(6)
    assert seen == [None], "only listings begun after it came count, and in those the worker runs"


def test_the_board_stops_without_waiters_and_starts_again_for_a_new_one(monkeypatch):
    monkeypatch.setattr(swarm_board, "POLL_S", 0.01)
    api = Api()
    board = board_of(api)
    assert board.wait(lambda s: None, timeout=0.1) is None
    wait_until(lambda: board._thread is None, 5, "the board to stop", 0.005)
    assert board.wait(lambda s: s.seq > 0 or None, timeout=2) is True


def test_a_manager_unreachable_at_first_is_waited_out(monkeypatch):
    """The board's own connection fails twice: it retries, it does not die and strand every waiter."""
    monkeypatch.setattr(swarm_board, "POLL_S", 0.01)
    api = Api()
    api.services_listed, api.tasks_listed = [SID + "cdef"], [task("complete", code=3)]
    board = board_of(api, failures=2)
    assert board.wait(lambda s: ended(SID, s, up), timeout=5) == Ended(3, "exited")


def test_a_secret_is_young_by_the_engines_clock_and_unreadable_counts_as_old():
    from datetime import datetime, timedelta

    from runtime.backends.swarm import PLACED_TIMEOUT_S, _age_s

    stamp = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S.123456789Z")
    assert 4 < _age_s(stamp) < PLACED_TIMEOUT_S  # a start may still be creating its service: kept
    assert _age_s("2020-01-01T00:00:00Z") > PLACED_TIMEOUT_S and _age_s(None) == _age_s("junk") == float("inf")
