"""Dispatch's decisions after a handoff (actors/dispatch_policy.py): pure, milliseconds."""

from __future__ import annotations

import pytest

from actors.dispatch_policy import AfterHandoff, after_handoff, lease_verdict


def test_an_accepted_job_is_the_200_and_the_pool_hears_nothing():
    assert after_handoff("accepted", released=False, attempt=1, attempts=2) == AfterHandoff(None, "dispatched")


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_livekit_error_is_a_502_never_retried(attempt):
    assert after_handoff("livekit_error", released=True, attempt=attempt, attempts=2).trigger == "livekit_error"


def test_a_released_claim_gives_the_lease_back_and_an_unreleased_one_retires_the_worker():
    assert lease_verdict("livekit_error", released=True) == "return"
    assert lease_verdict("livekit_error", released=False) == "not_accepted"  # the job may have reached it


@pytest.mark.parametrize("outcome", ["unregistered", "claimed", "not_accepted"])
def test_a_workers_own_failure_is_tried_on_another_worker_then_refused(outcome):
    first = after_handoff(outcome, released=False, attempt=1, attempts=2)
    last = after_handoff(outcome, released=False, attempt=2, attempts=2)
    assert first == AfterHandoff(outcome, "retry") and last == AfterHandoff(outcome, "handoff_failed")
    assert after_handoff(outcome, released=False, attempt=1, attempts=1).trigger == "handoff_failed"


def test_a_pool_at_rest_is_stopped_only_when_no_lease_can_be_on_its_way():
    from actors.dispatch_policy import may_stop_idle_pool

    quiet = {"same_pool": True, "waking": False, "resting": False, "triggers_in_flight": 0}
    assert may_stop_idle_pool(**quiet)
    assert not may_stop_idle_pool(**{**quiet, "triggers_in_flight": 1})  # a lease may be in its mailbox
    assert not may_stop_idle_pool(**{**quiet, "same_pool": False})  # an older incarnation asked
    assert not may_stop_idle_pool(**{**quiet, "waking": True})  # a trigger is starting it
    assert not may_stop_idle_pool(**{**quiet, "resting": True})  # being stopped already
