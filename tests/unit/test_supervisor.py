"""The supervisor with real pykka actors: restarts, intensity, ordered shutdown."""

from __future__ import annotations

import threading

import pykka
import pytest

from actors.messages import Drain, DrainChildren, ShutdownAll, StartChild, StopChild
from actors.supervisor import ChildSpec, Directory, Restart, Supervised, Supervisor
from tests.support import wait_until


class Boom:
    pass


class Child(Supervised):
    stopped: list[str] = []

    def on_receive(self, message):
        if isinstance(message, Boom):
            raise RuntimeError("boom")
        return "pong"

    def on_stop(self):
        Child.stopped.append(self.child_id)


class FailsToStart(Supervised):
    def setup(self):
        raise RuntimeError("cannot start")


@pytest.fixture
def tree():
    directory = Directory()
    gave_up: list[str] = []
    restarts: list[str] = []
    done = threading.Event()
    sup = Supervisor.start(
        directory, max_restarts=2, within_s=60,
        on_give_up=lambda reason: (gave_up.append(reason), done.set()),
        on_restart=restarts.append,
    )
    Child.stopped = []
    yield sup, directory, gave_up, restarts, done
    pykka.ActorRegistry.stop_all()


def test_a_crashed_child_is_restarted_with_a_new_ref(tree):
    sup, directory, gave_up, restarts, _ = tree
    sup.ask(StartChild(ChildSpec("a", Child.start)))
    first = directory.get("a")
    first.tell(Boom())
    wait_until(lambda: directory.get("a") is not first, 5, "the restart")
    assert directory.get("a").ask("ping") == "pong"
    assert restarts == ["a"] and gave_up == []


def test_exceeding_the_intensity_stops_everything_in_reverse_order_and_gives_up(tree):
    sup, directory, gave_up, restarts, done = tree
    for name in ("first", "second", "third"):
        sup.ask(StartChild(ChildSpec(name, Child.start)))
    for _ in range(3):
        ref = directory.get("second")
        ref.tell(Boom())
        wait_until(lambda: directory.get("second") is not ref, 5, "the crash to be handled")
    assert done.wait(5)
    assert "restart intensity exceeded (3 restarts within 60 s, limit 2)" in gave_up[0]
    assert Child.stopped == ["third", "first"]  # the crashed child had no on_stop: it crashed
    assert directory.with_prefix("") == {}


def test_temporary_children_are_not_restarted(tree):
    sup, directory, _, restarts, _ = tree
    sup.ask(StartChild(ChildSpec("t", Child.start, Restart.TEMPORARY)))
    directory.get("t").tell(Boom())
    wait_until(lambda: directory.get("t") is None, 5, "the temporary child to be dropped")
    assert restarts == []


def test_a_child_failing_in_setup_counts_as_a_crash(tree):
    sup, directory, gave_up, restarts, done = tree
    sup.ask(StartChild(ChildSpec("bad", FailsToStart.start)))
    assert done.wait(5), "a child that can never start must exhaust the intensity, not loop"
    assert len(restarts) == 2


def test_stopping_a_child_removes_it_without_restart(tree):
    sup, directory, _, restarts, _ = tree
    sup.ask(StartChild(ChildSpec("a", Child.start)))
    sup.ask(StopChild("a", graceful=False))
    assert directory.get("a") is None and Child.stopped == ["a"]
    sup.ask(ShutdownAll())
    assert restarts == []


def _raising_start(failures: list[int]):
    """A child spec's start that raises ``failures[0]`` times, then starts a Child."""

    def start(**child):
        if failures[0] > 0:
            failures[0] -= 1
            raise OSError("no such image")
        return Child.start(**child)

    return start


def test_a_start_that_raises_is_retried_as_a_restart_and_the_supervisor_lives(tree):
    sup, directory, gave_up, restarts, _ = tree
    sup.ask(StartChild(ChildSpec("flaky", _raising_start([1]))))
    wait_until(lambda: directory.get("flaky") is not None, 5, "the retried start")
    assert directory.get("flaky").ask("ping") == "pong"
    assert restarts == ["flaky"] and gave_up == [] and sup.is_alive()


def test_a_start_that_always_raises_exhausts_the_intensity_and_gives_up(tree):
    sup, directory, gave_up, restarts, done = tree
    sup.ask(StartChild(ChildSpec("other", Child.start)))
    sup.ask(StartChild(ChildSpec("broken", _raising_start([99]))))
    assert done.wait(5), "a start that always raises must end in give-up, not kill the supervisor"
    assert "child broken: start failed: OSError: no such image" in gave_up[0]
    assert len(restarts) == 2 and Child.stopped == ["other"]


class Drains(Supervised):
    """Stops itself some time after Drain, as a pool does once its sessions ended."""

    def on_receive(self, message):
        from actors.messages import Drain

        if isinstance(message, Drain):
            self.draining = True
        elif message == "done" and getattr(self, "draining", False):
            self.actor_ref.stop(block=False)
        return "pong"


def test_a_draining_child_stays_tracked_until_it_stopped(tree):
    sup, directory, _, restarts, _ = tree
    sup.ask(StartChild(ChildSpec("pool:gone", Drains.start)))
    ref = directory.get("pool:gone")
    sup.ask(StopChild("pool:gone", graceful=True))
    assert directory.get("pool:gone") is None  # no longer takes new work
    assert directory.with_prefix("pool:", draining=True) == {"gone": ref}  # still in stats
    ref.tell("done")
    wait_until(lambda: directory.with_prefix("pool:", draining=True) == {}, 5, "the drained child to be forgotten")
    assert restarts == []


def test_shutdown_also_stops_draining_children(tree):
    sup, directory, _, _, _ = tree
    sup.ask(StartChild(ChildSpec("pool:gone", Drains.start)))
    ref = directory.get("pool:gone")
    sup.ask(StopChild("pool:gone", graceful=True))
    sup.ask(ShutdownAll())
    assert not ref.is_alive() and directory.with_prefix("", draining=True) == {}


class Records(Drains):
    """A draining child that records why it drains."""

    whys: list[str] = []

    def on_receive(self, message):
        if isinstance(message, Drain):
            Records.whys.append(message.why)
        if isinstance(message, Boom):
            raise RuntimeError("boom")
        return super().on_receive(message)


def test_draining_every_pool_lets_them_finish_and_says_when_the_last_is_gone(tree):
    sup, directory, _, restarts, _ = tree
    Records.whys = []
    for name in ("pool:a", "pool:b", "scaler"):
        sup.ask(StartChild(ChildSpec(name, Records.start)))
    a, b = directory.get("pool:a"), directory.get("pool:b")
    drained = threading.Event()
    sup.ask(DrainChildren("pool:", drained.set))
    # The supervisor tells each pool to drain; each hears it on its own thread.
    wait_until(lambda: Records.whys == ["shutdown", "shutdown"], 5, "both pools to hear why they drain")
    assert directory.get("scaler") is not None
    assert directory.with_prefix("pool:") == {} and set(directory.with_prefix("pool:", draining=True)) == {"a", "b"}
    sup.ask(StartChild(ChildSpec("pool:new", Records.start)))  # a client added meanwhile: not started
    assert directory.get("pool:new") is None
    a.tell("done")
    wait_until(lambda: not a.is_alive(), 5, "pool a to stop")
    assert not drained.is_set()
    b.tell("done")
    assert drained.wait(5), "the runtime must hear that the last pool is gone"
    assert restarts == []


def test_draining_with_no_pool_at_all_is_drained_at_once(tree):
    sup, _, _, _, _ = tree
    drained = threading.Event()
    sup.ask(DrainChildren("pool:", drained.set))
    assert drained.is_set()


def test_a_pool_that_crashes_while_the_runtime_drains_is_started_again_and_drains(tree):
    sup, directory, gave_up, restarts, _ = tree
    Records.whys = []
    sup.ask(StartChild(ChildSpec("pool:a", Records.start)))
    drained = threading.Event()
    sup.ask(DrainChildren("pool:", drained.set))
    first = directory.get("pool:a", draining=True)
    first.tell(Boom())
    wait_until(lambda: (ref := directory.get("pool:a", draining=True)) is not None and ref is not first, 5,
               "a new incarnation to drain")
    assert Records.whys == ["shutdown", "shutdown"] and not drained.is_set() and restarts == ["pool:a"]
    directory.get("pool:a", draining=True).tell("done")
    assert drained.wait(5) and gave_up == []


def test_restart_intensity_counts_only_the_window_and_allows_up_to_the_limit():
    from actors.supervisor import add_restart

    kept, allowed = add_restart((), now=100.0, max_restarts=2, within_s=60)
    assert kept == (100.0,) and allowed
    kept, allowed = add_restart(kept, now=110.0, max_restarts=2, within_s=60)
    assert allowed
    kept, allowed = add_restart(kept, now=120.0, max_restarts=2, within_s=60)
    assert kept == (100.0, 110.0, 120.0) and not allowed  # a third within 60 s: give up
    kept, allowed = add_restart((100.0, 110.0), now=165.0, max_restarts=2, within_s=60)
    assert kept == (110.0, 165.0) and allowed  # the one at 100 is out of the window
    assert add_restart((), now=0.0, max_restarts=0, within_s=60)[1] is False


def test_starting_a_running_child_again_leaves_it_be_and_answers_its_ref(tree):
    """Two triggers may wake one client's pool at once: one pool, both told so."""
    sup, directory, *_ = tree
    answers: list = []
    sup.ask(StartChild(ChildSpec("a", Child.start), reply=answers.append))
    sup.ask(StartChild(ChildSpec("a", Child.start), reply=answers.append))
    assert answers == [directory.get("a"), directory.get("a")] and answers[0] is not None


def test_a_start_refused_while_shutting_down_answers_none(tree):
    sup, directory, *_ = tree
    sup.ask(DrainChildren("pool:", lambda: None))
    answers: list = []
    sup.ask(StartChild(ChildSpec("pool:late", Child.start), reply=answers.append))
    assert answers == [None] and directory.get("pool:late") is None


def test_a_child_stopped_at_rest_is_told_why_and_can_be_started_again(tree):
    sup, directory, *_ = tree
    told: list = []

    class Drains(Supervised):
        def on_receive(self, message):
            if isinstance(message, Drain):
                told.append(message.why)
                self.actor_ref.stop(block=False)

    sup.ask(StartChild(ChildSpec("pool:a", Drains.start)))
    first = directory.get("pool:a")
    sup.ask(StopChild("pool:a", graceful=True, why="idle"))
    assert directory.get("pool:a") is None
    wait_until(lambda: told == ["idle"], 5, "the drain")
    sup.ask(StartChild(ChildSpec("pool:a", Drains.start)))
    assert directory.get("pool:a") not in (None, first)
