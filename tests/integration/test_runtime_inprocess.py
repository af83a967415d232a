"""The actor tree in-process (no gateway): paths that HTTP alone cannot provoke on purpose."""

from __future__ import annotations

import queue
import threading

import pytest

from actors import pool_id
from actors.messages import GetStats, Lease, Leased
from runtime.server.app import Runtime
from runtime.settings import load_settings
from tests.support import Client, metric_value, wait_until, write_config


@pytest.fixture
def runtime(tmp_path, lk_a):
    env = write_config(tmp_path / "clients.yaml", [Client("alpha", lk_a, min_idle=1, max_size=2)],
                       workers={"lease_timeout_s": 2})
    rt = Runtime(load_settings(tmp_path / "clients.yaml", env)).start()
    yield rt
    rt.stop()


class Inbox:
    """Stands where the DispatchActor would: the pool answers a Lease with a ``tell``."""

    def __init__(self, answers: queue.Queue) -> None:
        self.answers = answers

    def tell(self, message: object) -> None:
        self.answers.put(message)


def stats(rt: Runtime):
    return rt.directory.get(pool_id("alpha")).ask(GetStats(), timeout=5)


def test_a_lease_whose_job_never_arrives_is_retired(runtime):
    """A dispatch LiveKit dropped looks like this: leased, registered, and no job ever comes."""
    wait_until(lambda: stats(runtime).idle == 1, 60, "a warm worker")
    answers: queue.Queue = queue.Queue()
    runtime.directory.get(pool_id("alpha")).tell(Lease(1, "room-lost", reply_to=Inbox(answers)))
    lease = answers.get(timeout=5)
    assert isinstance(lease, Leased)  # and no claim or dispatch is ever sent for it
    wait_until(
        lambda: metric_value(runtime.metrics.render().decode(), "autonomite_worker_exits_total",
                             client="alpha", cause="lease_unused") == 1,
        20, "the unused lease to be retired",
    )
    wait_until(lambda: (s := stats(runtime)).leased == 0 and s.idle == 1, 60, "the pool back at min_idle")
    assert lease.worker_id not in {w.id for w in stats(runtime).workers}


def runtime_listing_with(tmp_path, lk_a, listing):
    """A runtime with alpha (min_idle 1) whose backend lists alpha's workers through
    ``listing(real_list)`` (the pool's own listing); returns it and the real list."""
    from runtime.server.app import make_backend

    env = write_config(tmp_path / "clients.yaml", [Client("alpha", lk_a, min_idle=1, max_size=2)])
    settings = load_settings(tmp_path / "clients.yaml", env)
    backend = make_backend(settings)
    real_list = backend.list
    backend.list = lambda client_id=None: listing(real_list) if client_id == "alpha" else real_list(client_id)
    return Runtime(settings, backend=backend).start(), real_list


def test_a_slow_listing_of_workers_never_blocks_the_pool_nor_starts_workers_beside_them(tmp_path, lk_a):
    """PoolActor.setup lists the workers a previous incarnation left (a swarm manager is
    asked once per worker): meanwhile the pool answers stats, and decides nothing."""
    released = threading.Event()

    def slow_list(real_list):  # the pool's own listing hangs until the test lets it go
        released.wait(30)
        return real_list("alpha")

    rt, real_list = runtime_listing_with(tmp_path, lk_a, slow_list)
    try:
        pool = wait_until(lambda: rt.directory.get(pool_id("alpha")), 10, "the pool actor")
        answers: queue.Queue = queue.Queue()
        pool.tell(Lease(1, "room-early", reply_to=Inbox(answers), wait_s=30))
        during = pool.ask(GetStats(), timeout=2)  # answered while the listing hangs
        assert during.total == 0 and answers.empty(), "nothing is decided before the listing"
        assert real_list("alpha") == [], "no worker was started beside those being listed"
        released.set()
        lease = answers.get(timeout=60)  # the lease waited, and a worker started for it serves it
        assert isinstance(lease, Leased)
    finally:
        released.set()
        rt.stop()


def test_a_failed_listing_is_tried_again_without_a_crash_and_the_waiting_lease_is_served(tmp_path, lk_a):
    """A backend that cannot list for a moment (an engine blip as a client at zero is
    woken) must not crash the pool: each crash counts against the restart intensity that
    every pool shares, and three in ten seconds stop the runtime."""
    failures = [1, 2]

    def flaky_list(real_list):
        if failures:
            failures.pop()
            raise OSError("the engine did not answer")
        return real_list("alpha")

    rt, _ = runtime_listing_with(tmp_path, lk_a, flaky_list)
    try:
        pool = wait_until(lambda: rt.directory.get(pool_id("alpha")), 10, "the pool actor")
        answers: queue.Queue = queue.Queue()
        pool.tell(Lease(1, "room-after-a-blip", reply_to=Inbox(answers), wait_s=30))
        assert isinstance(answers.get(timeout=60), Leased)
        assert failures == [] and rt.directory.get(pool_id("alpha")) is pool  # listed again, never restarted
        assert metric_value(rt.metrics.render().decode(), "autonomite_actor_restarts_total", actor="pool") == 0
    finally:
        rt.stop()
