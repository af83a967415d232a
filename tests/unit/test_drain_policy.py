"""The drain policy (runtime/drain.py): what serve does on each shutdown request, in order."""

from __future__ import annotations

from runtime.drain import BeginDrain, DrainPolicy, EndSessions, Stop


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_sigterm_drains_and_the_last_session_ending_stops_it():
    p = DrainPolicy(drain_timeout_s=600)
    actions = p.request("SIGTERM", now=0)
    assert kinds(actions) == ["BeginDrain"] and "SIGTERM" in actions[0].why
    assert p.phase == "draining" and p.deadline == 600
    assert p.tick(now=599.9) == []
    actions = p.drained(now=30)
    assert kinds(actions) == ["Stop"] and "every session has ended" in actions[0].why
    assert p.deadline is None and p.tick(now=10_000) == []


def test_a_drain_that_outlasts_its_timeout_ends_the_sessions_then_stops_after_a_grace():
    p = DrainPolicy(drain_timeout_s=5, end_grace_s=20)
    p.request("SIGINT", now=100)
    actions = p.tick(now=105)
    assert kinds(actions) == ["EndSessions"] and "drain timeout (5 s)" in actions[0].why
    assert p.deadline == 125
    assert p.tick(now=124) == []
    assert kinds(p.drained(now=110)) == ["Stop"]  # they ended: stop now, not at the grace's end


def test_sessions_that_ignore_the_end_are_stopped_at_the_grace():
    p = DrainPolicy(drain_timeout_s=5, end_grace_s=20)
    p.request("SIGTERM", now=0)
    p.tick(now=5)
    actions = p.tick(now=25)
    assert kinds(actions) == ["Stop"] and "anyway" in actions[0].why
    assert p.phase == "stopping"


def test_a_second_signal_during_the_drain_ends_the_sessions_and_stops_at_once():
    for first, second in (("SIGTERM", "SIGTERM"), ("SIGTERM", "SIGINT"), ("admin", "SIGINT")):
        p = DrainPolicy(drain_timeout_s=600)
        p.request(first, now=0)
        actions = p.request(second, now=3)
        assert kinds(actions) == ["EndSessions", "Stop"], (first, second)
        assert f"{second} during the drain" in actions[-1].why  # the log says which
        assert p.request("SIGTERM", now=4) == []  # stopping already


def test_admin_now_ends_and_stops_from_serving_or_draining_and_says_so():
    p = DrainPolicy(drain_timeout_s=600)
    actions = p.request("admin_now", now=0)
    assert kinds(actions) == ["BeginDrain", "EndSessions", "Stop"]  # from serving: the gateway drains too
    assert all("POST /api/v1/admin/shutdown?now=1" in a.why for a in actions)
    p = DrainPolicy(drain_timeout_s=600)
    p.request("SIGTERM", now=0)
    assert kinds(p.request("admin_now", now=1)) == ["EndSessions", "Stop"]


def test_asking_to_drain_again_changes_nothing():
    p = DrainPolicy(drain_timeout_s=600)
    p.request("admin", now=0)
    assert p.request("admin", now=1) == [] and p.deadline == 600 and p.phase == "draining"


def test_drained_before_any_drain_is_ignored():
    p = DrainPolicy(drain_timeout_s=600)
    assert p.drained(now=0) == [] and p.phase == "serving"


def test_actions_are_plain_values():
    assert BeginDrain("x") == BeginDrain("x") and EndSessions("y") != Stop("y")
