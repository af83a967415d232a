"""The worker's end of the lease protocol (agent/lease_book.py: LeaseBook), without LiveKit."""

from __future__ import annotations

import pytest

from agent.contract import WorkerConfig
from agent.lease_book import CLAIM_TIMEOUT_S, LeaseBook


@pytest.fixture
def state() -> LeaseBook:
    s = LeaseBook(WorkerConfig("w1", "acme", "acme--w1", 1234, []))
    s.state = "idle"  # registered
    return s


def test_only_an_idle_registered_worker_can_be_claimed_and_only_by_its_own_id(state):
    assert not state.claim("L1", "someone-else")
    assert state.claim("L1", "w1") and state.state == "claimed"
    assert not state.claim("L2", "w1")  # claimed already: a second lease is refused


def test_a_worker_that_lost_livekit_cannot_be_claimed():
    s = LeaseBook(WorkerConfig("w1", "acme", "acme--w1", 1234, []), is_connected=lambda: False)
    s.state = "idle"
    assert not s.registered and not s.claim("L1", "w1")


def test_only_the_job_of_the_current_lease_is_accepted_and_only_once(state):
    state.claim("L1", "w1")
    assert not state.accept("J0", "L0")  # a stale dispatch of an earlier lease
    assert state.accept("J1", "L1") and state.state == "busy"
    assert not state.accept("J2", "L1")
    assert not state.job_accepted.is_set()  # not until LiveKit assigned it
    state.assigned(True)
    assert state.job_accepted.is_set() and not state.assignment_failed


def test_a_claim_is_released_only_by_its_lease_and_only_before_a_job(state):
    state.claim("L1", "w1")
    assert not state.release("L0")
    assert state.release("L1") and state.state == "idle"
    state.claim("L2", "w1")
    state.accept("J1", "L2")
    assert not state.release("L2") and state.state == "busy"


def test_load_is_free_until_busy(state):
    assert state.load() == 0.0
    state.claim("L1", "w1")
    assert state.load() == 0.0  # a status report between claim and job must not turn the job away
    state.accept("J1", "L1")
    assert state.load() == 1.0


def test_a_claim_without_a_job_expires(state):
    state.claim("L1", "w1")
    assert not state.claim_expired(state.claimed_at + CLAIM_TIMEOUT_S - 1)
    assert state.claim_expired(state.claimed_at + CLAIM_TIMEOUT_S + 1)
    state.accept("J1", "L1")
    assert not state.claim_expired(state.claimed_at + 10 * CLAIM_TIMEOUT_S)


def test_the_status_long_poll_answers_on_a_change_not_before():
    import asyncio
    import time

    async def scenario() -> tuple[float, float, float]:
        connected = [True]
        s = LeaseBook(WorkerConfig("w1", "acme", "acme--w1", 1234, []), is_connected=lambda: connected[0])
        s.state = "idle"
        t0 = time.monotonic()
        await s.changed_from(s.etag(), 0.3)  # nothing changes: it waits the whole time
        unchanged = time.monotonic() - t0
        etag = s.etag()
        asyncio.get_running_loop().call_later(0.05, s.claim, "L1", "w1")
        t0 = time.monotonic()
        await s.changed_from(etag, 5)  # a claim wakes it at once
        claimed = time.monotonic() - t0
        etag = s.etag()
        asyncio.get_running_loop().call_later(0.05, connected.__setitem__, 0, False)
        t0 = time.monotonic()
        await s.changed_from(etag, 5)  # a lost LiveKit connection (a flag, no event) too
        return unchanged, claimed, time.monotonic() - t0

    unchanged, claimed, lost = asyncio.run(scenario())
    assert unchanged >= 0.3
    assert claimed < 1 and lost < 1  # well before the 5 s the poll would otherwise last


def test_the_status_port_answers_only_to_its_workers_token():
    import asyncio

    import aiohttp

    from agent.contract import StatusAddress, status_token
    from agent.status_server import serve_status
    from runtime.backends.ports import free_port

    async def scenario() -> list[tuple[int, str]]:
        port = free_port()
        token = status_token("runtime-secret", "w1")
        s = LeaseBook(WorkerConfig("w1", "acme", "acme--w1", port, [], status_token=token))
        s.state = "idle"
        runner = await serve_status(s)
        seen = []
        try:
            async with aiohttp.ClientSession() as http:
                for who in (StatusAddress("127.0.0.1", port),  # no token
                            StatusAddress("127.0.0.1", port, status_token("runtime-secret", "w2")),  # another worker's
                            StatusAddress("127.0.0.1", port, token)):
                    async with http.post(who.url("/claim"), params={"lease_id": "L1", "worker_id": "w1"},
                                         headers=who.headers()) as r:
                        seen.append((r.status, (await r.json()).get("error", s.state)))
        finally:
            await runner.cleanup()
        return seen

    assert asyncio.run(scenario()) == [(401, "unauthorized"), (401, "unauthorized"), (200, "claimed")]


def test_a_worker_whose_runtime_died_is_never_claimed_again(state):
    state.runtime_gone = True
    assert not state.claim("L1", "w1") and state.state == "idle"


def _lifeline_run(in_session: bool, bound_s: float, monkeypatch) -> tuple[list, bool]:
    """A real pipe: its write end closed as a dead runtime's is; what the worker then does."""
    import asyncio
    import os

    from agent.lifeline import outlive_runtime, watch_lifeline

    read_end, write_end = os.pipe()
    monkeypatch.setenv("AUTONOMITE_LIFELINE_FD", str(read_end))
    ended: list = []

    async def run() -> bool:
        s = LeaseBook(WorkerConfig("w1", "acme", "acme--w1", 1234, [], orphan_timeout_s=bound_s))
        s.accepted_job = "J1" if in_session else None
        s.end_session = lambda reason, if_no_users, say: ended.append((reason, say))
        gone = watch_lifeline(asyncio.get_running_loop(), s)
        task = asyncio.create_task(outlive_runtime(s, gone))
        await asyncio.sleep(0.05)
        assert not gone.is_set() and not task.done()  # the runtime lives: nothing happens
        os.close(write_end)
        deadline = asyncio.get_running_loop().time() + bound_s + 2
        while not (task.done() or ended) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert task.done() != bool(ended)  # returned (exit now), or ended the session (and waits for its end)
        task.cancel()
        return s.runtime_gone

    try:
        return ended, asyncio.run(run())
    finally:
        os.close(read_end)


def test_the_lifelines_end_makes_a_worker_in_no_session_exit_at_once(monkeypatch):
    ended, gone = _lifeline_run(in_session=False, bound_s=30, monkeypatch=monkeypatch)
    assert gone and ended == []  # outlive_runtime returned at once: the worker exits


def test_a_session_outlives_the_runtime_until_the_bound_then_the_agent_says_why(monkeypatch):
    from agent.orphan import END_MESSAGE

    ended, gone = _lifeline_run(in_session=True, bound_s=0.2, monkeypatch=monkeypatch)
    assert gone and ended == [(END_MESSAGE, True)]
