"""What a pool's state machine hands back to its actor: small immutable effects.

:class:`actors.pool_machine.PoolMachine` decides; these say what to do about it (start or
stop a worker, set a timer, tell the dispatcher, answer a waiting lease) and carry what
the metrics and logs need. The PoolActor applies them in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WorkerState = Literal["starting", "idle", "leased", "draining"]
ExitCause = Literal[
    "session_end", "session_failed", "scaled_down", "reconfigured", "removed", "start_failed", "lease_unused",
    "lost_livekit", "crashed", "oom", "shutdown",
]
LeaseFailure = Literal["unregistered", "claimed", "not_accepted"]


@dataclass(frozen=True)
class Spawn:
    worker_id: str
    agent_name: str


@dataclass(frozen=True)
class Stop:
    worker_id: str


@dataclass(frozen=True)
class WakeAt:
    """Nothing can be started before ``at`` (backoff): reconcile again then."""

    at: float


@dataclass(frozen=True)
class CheckLeaseAt:
    """At ``at``, ask the worker whether the job of lease ``lease_no`` arrived."""

    worker_id: str
    lease_no: int
    at: float


@dataclass(frozen=True)
class SessionOver:
    worker_id: str
    failed: bool


@dataclass(frozen=True)
class Exited:
    worker_id: str
    cause: ExitCause
    exit_code: int


@dataclass(frozen=True)
class StartFailed:
    worker_id: str
    reason: str
    backoff_s: float


@dataclass(frozen=True)
class BecameReady:
    worker_id: str
    seconds: float  # start to registered; 0 for an adopted worker


@dataclass(frozen=True)
class LostRegistration:
    worker_id: str


@dataclass(frozen=True)
class Granted:
    """A waiting lease got its worker (now leased under that lease id)."""

    lease_id: str
    worker_id: str


@dataclass(frozen=True)
class GaveUp:
    """A waiting lease's deadline passed (or the pool is leaving): refuse it."""

    lease_id: str


@dataclass(frozen=True)
class Drained:
    """The pool is draining (its client was removed, or the runtime shuts down) and its
    last worker is gone: the pool may stop."""


@dataclass(frozen=True)
class AtRest:
    """The pool has had nothing to do (no worker, no waiting lease, no target) for the
    idle grace: it may be stopped until its client's next trigger."""


Effect = (
    Spawn | Stop | WakeAt | CheckLeaseAt | SessionOver | Exited | StartFailed | BecameReady | LostRegistration
    | Granted | GaveUp | Drained | AtRest
)
