"""Every message the actors exchange: small, immutable, in one place.

Messages that are asked from outside the actor system (the gateway's asyncio loop) carry a
``reply`` callable instead of relying on pykka's blocking futures: the actor calls it when
the answer is ready, and the bridge resolves an asyncio future thread-safely. Actors that
ask each other use pykka's ``ask`` and the handler's return value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from runtime.backends.base import WorkerHandle
from runtime.settings import ClientSettings

Reply = Callable[[Any], None]

WorkerState = Literal["starting", "idle", "leased", "draining"]


# -- PoolActor ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """Take one idle, registered worker. Answer: Leased or NoIdleWorker."""

    room_name: str


@dataclass(frozen=True)
class Leased:
    client_id: str
    worker_id: str
    agent_name: str


@dataclass(frozen=True)
class NoIdleWorker:
    client_id: str


@dataclass(frozen=True)
class ReturnLease:
    """The dispatch failed: the worker never got a job and may serve the next one."""

    worker_id: str


@dataclass(frozen=True)
class Resize:
    """From the scaler: how many live workers the pool should keep."""

    target: int
    direction: Literal["up", "down"]


@dataclass(frozen=True)
class GetStats:
    reply: Reply | None = field(default=None, compare=False)


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    state: WorkerState
    agent_name: str
    ref: str


@dataclass(frozen=True)
class PoolStats:
    client_id: str
    starting: int
    idle: int
    leased: int
    draining: int
    min_idle: int
    max_size: int
    target: int
    missed_total: int
    backoff_s: float
    workers: tuple[WorkerInfo, ...]
    last_error: str | None = None  # why the last worker start failed, until one succeeds

    @property
    def total(self) -> int:
        """Live workers: the draining ones are on their way out."""
        return self.starting + self.idle + self.leased

    @property
    def utilization(self) -> float:
        return self.leased / self.total if self.total else 0.0

    def as_json(self) -> dict:
        return {
            "total": self.total,
            "starting": self.starting,
            "idle": self.idle,
            "leased": self.leased,
            "draining": self.draining,
            "min_idle": self.min_idle,
            "max_size": self.max_size,
            "target": self.target,
            "utilization": round(self.utilization, 4),
            "missed_total": self.missed_total,
            "backoff_s": self.backoff_s,
            "last_error": self.last_error,
            "workers": [
                {"id": w.id, "state": w.state, "agent_name": w.agent_name, "ref": w.ref} for w in self.workers
            ],
        }


@dataclass(frozen=True)
class Reconfigure:
    """New settings for this client: idle workers with old credentials or catalog are replaced."""

    client: ClientSettings


@dataclass(frozen=True)
class Drain:
    """The client is leaving: stop idle workers now, leased ones after their session, then stop."""


@dataclass(frozen=True)
class Tick:
    """A timer fired: retry starts after a backoff, expire stale leases."""


@dataclass(frozen=True)
class CheckLease:
    """A lease is this old: has its worker received the job? If not, the dispatch was lost."""

    worker_id: str
    lease_no: int  # which lease of this worker the timer was set for


@dataclass(frozen=True)
class LeaseUnused:
    """The leased worker never got its job: retire it rather than strand it."""

    worker_id: str


@dataclass(frozen=True)
class Crash:
    """Fault injection for tests: the pool raises, as if it had a bug."""


# Sent by a pool's helper threads back into its own mailbox.


@dataclass(frozen=True)
class WorkerStarted:
    worker_id: str
    handle: WorkerHandle


@dataclass(frozen=True)
class WorkerReady:
    worker_id: str
    busy: bool = False  # an adopted worker already serving a session


@dataclass(frozen=True)
class WorkerStartFailed:
    worker_id: str
    reason: str


@dataclass(frozen=True)
class WorkerExited:
    worker_id: str
    exit_code: int


# -- DispatchActor -------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerRequest:
    client_id: str
    agent: str
    room_name: str
    user_email: str | None = None
    context: dict | None = None
    conversation_id: str | None = None


@dataclass(frozen=True)
class Trigger:
    request: TriggerRequest
    client: ClientSettings
    reply: Reply = field(compare=False)


@dataclass(frozen=True)
class TriggerResult:
    """What the gateway turns into an HTTP response."""

    status: int
    body: dict
    retry_after_s: int | None = None


@dataclass(frozen=True)
class DispatchFinished:
    """The LiveKit call came back (in a helper thread); finish the trigger in the mailbox."""

    trigger: Trigger
    lease: Leased
    started_at: float
    dispatch_id: str | None
    error: str | None


@dataclass(frozen=True)
class SessionEnded:
    """From a pool: a leased worker is gone. If its session failed, its dispatch is deleted,
    since LiveKit keeps a dispatch active after its worker died (livekit/agents#1472)."""

    client_id: str
    worker_id: str
    failed: bool


# -- ScalerActor ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleTick:
    """Time to read every pool and resize the ones that need it."""


# -- Supervisor ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildFailed:
    child_id: str
    error: str


@dataclass(frozen=True)
class StartChild:
    spec: Any  # actors.supervisor.ChildSpec


@dataclass(frozen=True)
class StopChild:
    child_id: str
    graceful: bool = True  # a pool drains (sessions finish) instead of stopping at once


@dataclass(frozen=True)
class ShutdownAll:
    """Stop every child, last started first, each within its shutdown timeout."""
