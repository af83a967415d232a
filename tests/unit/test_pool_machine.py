"""The pool's decisions, in milliseconds: no threads, no backend, a clock we move by hand."""

from __future__ import annotations

import itertools

import pytest

from actors.pool_machine import (
    AtRest,
    BecameReady,
    CheckLeaseAt,
    Drained,
    Exited,
    GaveUp,
    Granted,
    LostRegistration,
    PoolMachine,
    SessionOver,
    Spawn,
    StartFailed,
    Stop,
    WakeAt,
)


def machine(min_idle: int = 1, max_size: int = 3, fp: str = "v1") -> PoolMachine:
    ids = itertools.count(1)
    return PoolMachine("acme", min_idle, max_size, fp, lease_timeout_s=60, new_id=lambda: f"w{next(ids)}")


def spawned(effects: list) -> list[str]:
    return [e.worker_id for e in effects if isinstance(e, Spawn)]


def stopped(effects: list) -> list[str]:
    return [e.worker_id for e in effects if isinstance(e, Stop)]


def warm(m: PoolMachine, now: float = 0.0) -> list[str]:
    """Start the pool and make every worker it spawns register."""
    ids = spawned(m.reconcile(now))
    for wid in ids:
        m.status(wid, True, "idle", None, now + 1)
    m.reconcile(now + 1)
    return ids


def test_a_new_pool_starts_min_idle_workers_and_they_are_idle_once_registered():
    m = machine(min_idle=2)
    ids = spawned(m.reconcile(0))
    assert ids == ["w1", "w2"] and m.count("starting") == 2
    m.status("w1", False, "starting", None, 0.5)  # up, not registered yet
    assert m.count("idle") == 0
    m.status("w1", True, "idle", None, 1.5)
    effects = m.reconcile(1.5)
    assert m.count("idle") == 1 and BecameReady("w1", 1.5) in effects


def test_a_lease_refills_the_idle_floor_at_once_and_never_passes_max_size():
    m = machine(min_idle=1, max_size=2)
    warm(m)
    w = m.lease("L1", 2)
    assert w is not None and w.state == "leased" and w.lease_id == "L1"
    assert spawned(m.reconcile(2)) == ["w2"]
    m.status("w2", True, "idle", None, 3)
    assert m.lease("L2", 3) is not None
    assert spawned(m.reconcile(3)) == []  # two leased: max_size reached
    assert m.lease("L3", 3) is None and m.missed_total == 1


def test_a_lease_sets_the_lease_timer():
    m = machine()
    warm(m)
    m.lease("L1", 5)
    assert CheckLeaseAt("w1", 1, 65) in m.reconcile(5)


def test_a_worker_that_lost_livekit_is_not_leased_until_it_registered_again():
    m = machine(min_idle=1)
    warm(m)
    m.status("w1", False, "idle", None, 2)
    assert LostRegistration("w1") in m.reconcile(2)
    assert m.lease("L1", 2) is None
    m.status("w1", True, "idle", None, 3)
    assert m.lease("L2", 3).id == "w1"


def test_a_claim_refused_as_unregistered_puts_the_worker_back_to_starting():
    m = machine()
    warm(m)
    m.lease("L1", 2)
    m.lease_failed("w1", "L1", "unregistered", 2)
    assert m.workers["w1"].state == "starting"
    m.status("w1", True, "idle", None, 3)
    assert m.workers["w1"].state == "idle"


def test_an_unaccepted_dispatch_retires_the_worker():
    m = machine()
    warm(m)
    m.lease("L1", 2)
    m.lease_failed("w1", "L1", "not_accepted", 6)
    assert "w1" in stopped(m.reconcile(6)) and m.workers["w1"].retire_cause == "lease_unused"


def test_a_failure_report_for_an_older_lease_changes_nothing():
    m = machine()
    warm(m)
    m.lease("L1", 2)
    m.lease_failed("w1", "L0", "not_accepted", 2)
    m.return_lease("w1", "L0")
    assert m.workers["w1"].state == "leased"
    m.return_lease("w1", "L1")
    assert m.workers["w1"].state == "idle"


def test_an_adopted_worker_that_says_claimed_or_busy_is_leased_never_leased_again():
    m = machine(min_idle=1, max_size=3)
    m.adopt("a1", "acme--a1", "v1", 0)
    m.adopt("a2", "acme--a2", "v1", 0)
    m.reconcile(0)
    m.status("a1", True, "claimed", "L-old", 1)  # an earlier incarnation leased it
    m.status("a2", True, "busy", "L-older", 1)  # mid-session
    fresh = spawned(m.reconcile(1))  # two leased: the idle floor needs a new worker
    assert m.workers["a1"].state == "leased" and m.workers["a2"].state == "leased"
    m.status(fresh[0], True, "idle", None, 2)
    assert m.lease("L-new", 2).id == fresh[0]
    assert m.lease("L-newer", 2) is None


def test_an_idle_worker_claimed_behind_the_pools_back_becomes_leased():
    m = machine()
    warm(m)
    m.status("w1", True, "claimed", "L-old", 2)
    assert m.workers["w1"].state == "leased" and m.lease("L1", 2) is None


def test_adopted_workers_block_shrinking_until_every_probe_answered():
    m = machine(min_idle=1, max_size=3)
    for i in range(3):
        m.adopt(f"a{i}", f"acme--a{i}", "v1", 0)
    assert stopped(m.reconcile(0)) == []
    for i in range(3):
        m.status(f"a{i}", True, "idle", None, 1)
    assert len(stopped(m.reconcile(1))) == 2  # back to min_idle once all are known


def test_failed_starts_back_off_doubling_and_a_ready_worker_resets_it():
    m = machine(min_idle=1)
    m.reconcile(0)
    m.start_failed("w1", "image not found", started=False, now=0)
    effects = m.reconcile(0)
    assert StartFailed("w1", "image not found", 0.5) in effects and WakeAt(0.5) in effects
    assert Exited("w1", "start_failed", -1) in effects and spawned(effects) == []
    assert spawned(m.reconcile(0.5)) == ["w2"]
    m.start_failed("w2", "image not found", started=False, now=0.5)
    assert WakeAt(1.5) in m.reconcile(0.5)  # 1 s: doubled
    ids = spawned(m.reconcile(1.5))
    m.status(ids[0], True, "idle", None, 2)
    assert m.failures == 0 and m.last_error is None


def test_a_worker_that_exits_before_registering_counts_as_a_failed_start():
    m = machine()
    m.reconcile(0)
    m.exited("w1", 1, 1)
    effects = m.reconcile(1)
    assert Exited("w1", "start_failed", 1) in effects and m.failures == 1


@pytest.mark.parametrize("code,cause", [(0, "session_end"), (1, "session_failed")])
def test_a_leased_worker_exit_ends_its_session(code, cause):
    m = machine()
    warm(m)
    m.lease("L1", 2)
    m.exited("w1", code, 3)
    effects = m.reconcile(3)
    assert Exited("w1", cause, code) in effects
    assert SessionOver("w1", failed=code != 0) in effects
    assert spawned(effects) == ["w2"]  # refilled


def test_a_worker_killed_at_its_memory_limit_exits_as_oom_whatever_it_was_doing():
    m = machine(min_idle=2)
    warm(m)
    m.lease("L1", 2)
    m.exited("w1", -9, 3, oom=True)  # leased: its session failed
    m.exited("w2", -9, 3, oom=True)  # idle, and retired meanwhile or not: oom is what happened
    effects = m.reconcile(3)
    assert Exited("w1", "oom", -9) in effects and SessionOver("w1", failed=True) in effects
    assert Exited("w2", "oom", -9) in effects and m.failures == 0


def test_a_start_killed_at_its_memory_limit_backs_off():
    m = machine()
    m.reconcile(0)
    m.exited("w1", -9, 1, oom=True)
    effects = m.reconcile(1)
    assert Exited("w1", "oom", -9) in effects and m.failures == 1 and "memory limit" in m.last_error


def test_resize_is_clamped_between_min_idle_and_max_size():
    m = machine(min_idle=1, max_size=3)
    m.resize(10)
    assert m.target == 3
    m.resize(0)
    assert m.target == 1


def test_scaling_down_stops_starting_workers_first_then_the_most_recently_ready():
    m = machine(min_idle=1, max_size=4)
    m.resize(3)
    warm(m)
    m.workers["w1"].ready_at, m.workers["w2"].ready_at, m.workers["w3"].ready_at = 1, 3, 2
    m.resize(1)
    assert sorted(stopped(m.reconcile(5))) == ["w2", "w3"]


def test_a_leased_worker_is_never_stopped_by_a_resize():
    m = machine(min_idle=0, max_size=2)
    m.resize(2)
    warm(m)
    m.lease("L1", 2)
    m.lease("L2", 2)
    m.resize(0)
    assert stopped(m.reconcile(3)) == []


def test_a_reload_replaces_idle_workers_rolling_without_dropping_below_min_idle():
    m = machine(min_idle=2, max_size=4)
    warm(m)  # w1, w2 idle on v1
    m.reconfigure(2, 4, "v2")
    effects = m.reconcile(2)
    assert stopped(effects) == [] and spawned(effects) == ["w3", "w4"]  # surge first
    assert m.count("idle") == 2
    m.status("w3", True, "idle", None, 3)
    assert len(stopped(m.reconcile(3))) == 1  # one stale goes once its replacement is idle
    assert m.count("idle") == 2
    m.status("w4", True, "idle", None, 4)
    m.reconcile(4)
    assert m.count("idle") == 2 and {w.config_fp for w in m.workers.values() if w.state == "idle"} == {"v2"}


def test_a_reload_at_max_size_retires_only_what_makes_room():
    m = machine(min_idle=1, max_size=2)
    m.resize(2)
    warm(m)
    m.lease("L1", 2)  # w1 leased (stale after the reload, but it finishes its session)
    m.reconfigure(1, 2, "v2")
    effects = m.reconcile(3)
    # No room to surge: the stale idle worker makes room for its replacement.
    assert stopped(effects) == ["w2"] and spawned(effects) == ["w3"]
    assert m.workers["w1"].state == "leased"


def test_leases_prefer_workers_with_the_current_settings():
    m = machine(min_idle=2, max_size=4)
    warm(m)
    m.reconfigure(2, 4, "v2")
    new = spawned(m.reconcile(2))
    m.status(new[0], True, "idle", None, 3)
    assert m.lease("L1", 3).config_fp == "v2"


def test_a_stale_starting_worker_is_replaced_at_once():
    m = machine(min_idle=1)
    m.reconcile(0)
    m.reconfigure(1, 3, "v2")
    effects = m.reconcile(1)
    assert stopped(effects) == ["w1"] and spawned(effects) == ["w2"]


def test_draining_stops_idle_workers_lets_leased_finish_then_reports_drained():
    m = machine(min_idle=2)
    warm(m)
    m.lease("L1", 2)
    m.drain()
    effects = m.reconcile(2)
    assert stopped(effects) == ["w2"] and Drained() not in effects
    assert m.lease("L2", 2) is None
    m.exited("w2", 0, 3)
    m.exited("w1", 0, 4)
    assert Drained() in m.reconcile(4)


def test_a_shutdown_drain_stops_idle_workers_as_shutdown_and_keeps_the_session():
    m = machine(min_idle=2)
    warm(m)
    m.lease("L1", 2)
    m.drain("shutdown")
    effects = m.reconcile(2)
    assert stopped(effects) == ["w2"] and m.workers["w2"].retire_cause == "shutdown"
    assert m.workers["w1"].state == "leased" and spawned(effects) == []
    m.exited("w2", 0, 3)
    assert Exited("w2", "shutdown", 0) in m.reconcile(3)
    m.exited("w1", 0, 40)
    effects = m.reconcile(40)
    assert Exited("w1", "session_end", 0) in effects and Drained() in effects


def test_a_draining_pool_waits_for_an_adopted_workers_probe_before_stopping_it():
    """A pool started again during a shutdown drain adopts a worker that may be mid-session:
    stopping it before its probe answered would cut that call."""
    m = machine(min_idle=1)
    m.adopt("a1", "acme--a1", "v1", 0)
    m.drain("shutdown")
    assert stopped(m.reconcile(0)) == [] and Drained() not in m.reconcile(0)
    m.status("a1", True, "busy", "L0", 1)
    assert stopped(m.reconcile(1)) == [] and m.workers["a1"].state == "leased"
    m.adopt("a2", "acme--a2", "v1", 1)  # and one that turns out idle goes as soon as it says so
    m.status("a2", True, "idle", None, 2)
    assert stopped(m.reconcile(2)) == ["a2"]


def test_a_retired_worker_whose_start_answer_comes_late_is_stopped():
    m = machine()
    m.reconcile(0)
    m.reconfigure(1, 3, "v2")
    m.reconcile(1)
    assert m.started("w1") is False and m.started("w2") is True


def test_the_lease_timer_retires_a_worker_whose_job_never_came():
    m = machine()
    warm(m)
    m.lease("L1", 2)
    m.lease_unused("w1", lease_no=0)  # a timer of an older lease
    assert m.workers["w1"].state == "leased"
    m.lease_unused("w1", lease_no=1)
    assert "w1" in stopped(m.reconcile(62))


def test_a_worker_that_lost_livekit_and_never_came_back_is_replaced():
    m = machine(min_idle=1, max_size=1)
    warm(m)
    m.status("w1", False, "idle", None, 10)
    assert WakeAt(70) in m.reconcile(10)
    assert stopped(m.reconcile(69)) == []
    effects = m.reconcile(70)
    assert stopped(effects) == ["w1"] and m.workers["w1"].retire_cause == "lost_livekit"
    assert spawned(effects) == ["w2"]


def test_coming_back_to_livekit_is_not_a_new_start():
    m = machine()
    warm(m)
    m.status("w1", False, "idle", None, 10)
    m.status("w1", True, "idle", None, 500)
    effects = m.reconcile(500)
    assert m.workers["w1"].state == "idle" and not [e for e in effects if isinstance(e, BecameReady)]
    assert stopped(m.reconcile(1000)) == []  # back in time: no replacement


def test_an_adopted_worker_that_is_shutting_down_is_never_leased():
    m = machine(min_idle=1, max_size=3)
    m.adopt("a1", "acme--a1", "v1", 0)
    m.reconcile(0)
    m.status("a1", True, "draining", None, 1)
    m.reconcile(1)
    assert m.workers["a1"].state == "draining" and m.lease("L1", 1) is None


# -- bursts: leases that wait for a worker being started ----------------------------------


def one_leased_one_waiting(m: PoolMachine, deadline: float) -> None:
    """The only idle worker goes to L1 at t=2; L2 finds none and waits until ``deadline``."""
    warm(m)
    m.lease("L1", 2)
    m.reconcile(2)
    assert m.lease("L2", 2) is None and m.wait("L2", 2, deadline)


def test_a_burst_waits_for_the_workers_started_for_it_first_come_first_served():
    m = machine(min_idle=1, max_size=3)
    warm(m)
    assert m.lease("L1", 2).id == "w1"
    assert spawned(m.reconcile(2)) == ["w2"]  # the idle floor
    assert m.lease("L2", 2) is None and m.wait("L2", 2, 5)
    assert spawned(m.reconcile(2)) == ["w3"]  # one more, for the waiter
    assert m.lease("L3", 2.1) is None and m.wait("L3", 2.1, 5.1)
    assert spawned(m.reconcile(2.1)) == []  # max_size reached
    # Beyond max_size, a lease cannot wait: both starting workers are spoken for.
    assert m.lease("L4", 2.2) is None and not m.wait("L4", 2.2, 5.2)
    assert m.missed_total == 3  # the scaler still sees every miss
    m.status("w3", True, "idle", None, 2.5)  # the later worker is ready first: it goes to L2
    assert Granted("L2", "w3") in m.reconcile(2.5)
    m.status("w2", True, "idle", None, 2.6)
    assert Granted("L3", "w2") in m.reconcile(2.6)
    assert m.workers["w2"].lease_id == "L3" and m.count("leased") == 3 and not m.waiters


def test_a_waiter_gives_up_at_its_deadline():
    m = machine(min_idle=1, max_size=2)
    one_leased_one_waiting(m, 4)
    effects = m.reconcile(2)
    assert WakeAt(4) in effects
    assert not any(isinstance(e, GaveUp) for e in m.reconcile(3.9))
    assert GaveUp("L2") in m.reconcile(4)
    m.status("w2", True, "idle", None, 4.5)  # too late for L2: it stays idle for the next caller
    assert not any(isinstance(e, Granted) for e in m.reconcile(4.5)) and m.count("idle") == 1


def test_nothing_waits_at_max_size_when_nothing_is_starting_or_while_leaving():
    m = machine(min_idle=1, max_size=1)
    warm(m)
    m.lease("L1", 2)
    m.reconcile(2)
    assert m.lease("L2", 2) is None and not m.wait("L2", 2, 5)
    m = machine(min_idle=1, max_size=3)
    warm(m)
    m.lease("L1", 2)
    m.reconcile(2)
    assert m.wait("L2", 2, 5)
    m.drain()
    assert GaveUp("L2") in m.reconcile(2.1) and not m.wait("L3", 2.1, 5)


def test_a_waiter_does_not_wait_out_a_start_backoff_longer_than_its_deadline():
    m = machine(min_idle=1, max_size=3)
    ids = spawned(m.reconcile(0))
    m.exited(ids[0], 1, 0.5)  # exited before registering: back off
    for _ in range(5):
        wid = spawned(m.reconcile(m.next_start_at))[0]
        m.exited(wid, 1, m.next_start_at)
    assert m.backoff_s(m.next_start_at - 8) > 3 and m.count("starting") == 0
    now = m.next_start_at - 8
    assert m.lease("L1", now) is None and not m.wait("L1", now, now + 3)


def test_a_lease_never_jumps_the_queue():
    m = machine(min_idle=1, max_size=4)
    one_leased_one_waiting(m, 5)
    m.reconcile(2)
    m.status("w2", True, "idle", None, 2.5)  # ready, but its status is not reconciled yet
    assert m.lease("L3", 2.5) is None  # L2 came first
    assert Granted("L2", "w2") in m.reconcile(2.5)


def test_nothing_waits_while_the_pool_has_lost_livekit():
    m = machine(min_idle=2, max_size=4)
    warm(m)
    m.status("w1", False, "idle", None, 2)  # LiveKit went away
    m.status("w2", False, "idle", None, 2)
    m.reconcile(2)
    assert m.lease("L1", 2.5) is None and not m.wait("L1", 2.5, 5.5)


# -- a client at zero: the pool at rest ----------------------------------------------------


def resting(rest_after_s: float = 30.0, min_idle: int = 0) -> PoolMachine:
    m = machine(min_idle=min_idle)
    m.rest_after_s = rest_after_s
    return m


def test_a_pool_at_zero_says_it_is_at_rest_after_its_grace_and_again_if_it_is_kept():
    m = resting(30.0)
    first = m.reconcile(0.0)
    assert not any(isinstance(e, AtRest) for e in first)
    assert WakeAt(30.0) in first  # a timer, so the grace is noticed with nothing else happening
    assert any(isinstance(e, AtRest) for e in m.reconcile(30.0))
    assert not any(isinstance(e, AtRest) for e in m.reconcile(45.0))  # said once per grace
    assert any(isinstance(e, AtRest) for e in m.reconcile(60.0))  # still here: said again


def test_any_work_puts_rest_off_and_the_grace_counts_from_when_it_ends():
    m = resting(30.0)
    m.reconcile(0.0)
    lease_id = "L1"
    assert m.lease(lease_id, 10.0) is None and m.wait(lease_id, 10.0, 40.0)  # a trigger: a worker starts
    effects = m.reconcile(10.0)
    assert spawned(effects) and not any(isinstance(e, AtRest) for e in m.reconcile(31.0))
    worker = next(iter(m.workers))
    m.status(worker, True, "idle", None, 12.0)
    m.reconcile(12.0)  # the waiting lease gets it
    m.exited(worker, 0, 20.0)  # its session ended, and with it the worker
    assert not any(isinstance(e, AtRest) for e in m.reconcile(20.0))
    assert not any(isinstance(e, AtRest) for e in m.reconcile(49.0))
    assert any(isinstance(e, AtRest) for e in m.reconcile(50.0))


def test_a_pool_that_keeps_warm_workers_or_has_a_target_is_never_at_rest():
    warm_pool = resting(1.0, min_idle=1)
    assert not any(isinstance(e, AtRest) for e in warm_pool.reconcile(0.0) + warm_pool.reconcile(100.0))
    scaled = resting(1.0)
    scaled.resize(1)  # the scaler keeps one warm after a busy spell
    assert not any(isinstance(e, AtRest) for e in scaled.reconcile(0.0) + scaled.reconcile(100.0))
    never = machine(min_idle=0)  # no rest_after_s: it stays
    assert not any(isinstance(e, AtRest) for e in never.reconcile(0.0) + never.reconcile(1e6))
