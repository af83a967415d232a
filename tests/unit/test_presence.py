"""When a session ends for want of its end user (agent.presence.Attendance): pure, in ms."""

from __future__ import annotations

from agent.presence import Attendance


def test_the_session_ends_only_once_nobody_came_back_within_the_grace():
    a = Attendance(10.0)
    assert a.update(1, now=0.0) is None  # the caller is here
    assert a.update(0, now=5.0) == 15.0  # they left: the session ends at 15 unless one is back
    assert not a.over(0, now=14.9)
    assert a.over(0, now=15.0)


def test_a_caller_back_within_the_grace_keeps_the_session_and_a_later_leave_starts_anew():
    a = Attendance(10.0)
    a.update(1, now=0.0)
    a.update(0, now=5.0)
    assert a.update(1, now=8.0) is None  # back (a reconnect: a leave and a join)
    assert not a.over(1, now=100.0)
    assert a.update(0, now=100.0) == 110.0  # a new absence gets a whole grace
    assert a.update(0, now=104.0) == 110.0  # a second departure does not push it back


def test_no_caller_yet_is_not_an_absence_unless_livekit_says_one_left():
    a = Attendance(10.0)
    assert a.update(0, now=0.0) is None  # user_join_timeout_s rules until someone comes
    assert not a.over(0, now=1000.0)
    assert a.update(0, now=3.0, someone_left=True) == 13.0  # a webhook: one came and went


def test_the_agents_own_reconnect_restarts_the_grace():
    a = Attendance(10.0)
    a.update(1, now=0.0)
    a.update(0, now=1.0)  # everyone vanished: our own connection went
    a.restart(now=20.0)  # back after 19 s: the caller's absence counts from now
    assert not a.over(0, now=29.0)
    assert a.over(0, now=30.0)
    b = Attendance(10.0)
    b.restart(now=5.0)  # nobody was missing: nothing to restart
    assert b.update(1, now=6.0) is None


def test_a_zero_grace_ends_the_session_at_the_last_departure():
    a = Attendance(0.0)
    a.update(1, now=0.0)
    assert a.over(0, now=1.0)
