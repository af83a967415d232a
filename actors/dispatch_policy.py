"""What dispatch does once a handoff is over: pure decisions, no I/O, no clock.

The DispatchActor (``actors/dispatch.py``) performs them: it tells the pool what became of
the lease, then answers, retries or refuses the trigger. Why these answers:

- **Accepted**: the 200. The pool hears nothing more: the worker reports its session.
- **A LiveKit error** is a 502, never retried: another worker would meet the same server.
  The lease goes back if the worker released its claim (it took no job); if not, the job
  may have reached it, so it counts as a failed lease and is never leased again.
- **Any other failure** is that worker's (it lost LiveKit, an earlier pool incarnation
  leased it, or it did not accept in time): the pool hears why, and the trigger is tried
  on another idle worker, up to ``attempts`` in all; then a 503 ``handoff_failed``. A
  second worker usually succeeds where the first failed; more tries keep the caller waiting.

Unit-tested in milliseconds: ``tests/unit/test_dispatch_policy.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from actors.pool_effects import LeaseFailure
from runtime.livekit.handoff import Outcome

LeaseVerdict = Literal["return"] | LeaseFailure  # "return": the worker may serve the next trigger
TriggerStep = Literal["dispatched", "livekit_error", "retry", "handoff_failed"]


@dataclass(frozen=True)
class AfterHandoff:
    lease: LeaseVerdict | None  # what the pool hears of the lease; None: nothing
    trigger: TriggerStep


def after_handoff(outcome: Outcome, released: bool, attempt: int, attempts: int) -> AfterHandoff:
    """``attempt``: this handoff's number (from 1); ``attempts``: how many a trigger gets."""
    if outcome == "accepted":
        return AfterHandoff(None, "dispatched")
    if outcome == "livekit_error":
        return AfterHandoff(lease_verdict(outcome, released), "livekit_error")
    return AfterHandoff(lease_verdict(outcome, released), "retry" if attempt < attempts else "handoff_failed")


def lease_verdict(outcome: Outcome, released: bool) -> LeaseVerdict:
    """What the pool must hear about a handoff that did not end in an accepted job (also
    when the dispatcher that asked for it is gone)."""
    if outcome == "livekit_error" and released:
        return "return"
    if outcome in ("unregistered", "claimed"):
        return outcome
    # Not accepted, or a claim that could not be released (the job may have reached the worker).
    return "not_accepted"


def may_stop_idle_pool(*, same_pool: bool, waking: bool, resting: bool, triggers_in_flight: int) -> bool:
    """A pool at rest asked to be stopped (PoolIdle). The dispatcher is the only one that
    sends it leases, so it alone can say that none is on its way: yes when the asking pool
    is the current one (not an older incarnation), no trigger of its client is in flight,
    and the client's pool is neither being started nor stopped already. A no puts it off:
    the pool asks again after another idle grace."""
    return same_pool and not waking and not resting and triggers_in_flight == 0

