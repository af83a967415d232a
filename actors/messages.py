"""Every message the actors exchange: small, immutable, in one place.

Messages that are asked from outside the actor system (the gateway's asyncio loop) carry a
``reply`` callable instead of relying on pykka's blocking futures: the actor calls it when
the answer is ready, and the bridge resolves an asyncio future thread-safely. Actors never
``ask`` each other: they answer with a ``tell`` to a ``reply_to`` ref or callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pykka

from actors.pool_effects import LeaseFailure, WorkerState
from agent.contract import Milestones, ReportedState, StatusAddress
from runtime.backends.base import WorkerHandle
from runtime.settings import ClientSettings, LiveKitSettings

if TYPE_CHECKING:  # each of these imports this module
    from actors.supervisor import ChildSpec
    from runtime.livekit.handoff import Handoff

Reply = Callable[[Any], None]  # takes the message's answer (its type is in each message's docstring)
ActorRef = pykka.ActorRef[Any]


# -- The lease protocol: DispatchActor <-> PoolActor, messages both ways ---------------------
#
# dispatch -> pool: Lease. pool -> dispatch: Leased or NoIdleWorker. Then the dispatcher
# claims the worker on its status port, creates the LiveKit dispatch and waits for the
# worker to accept the job (runtime/livekit/handoff.py), and tells the pool how it went:
# nothing (accepted), ReturnLease (the dispatch failed, the claim was released) or
# LeaseFailed. Neither side ever waits on the other.


@dataclass(frozen=True)
class Lease:
    """Take one idle, registered worker for this trigger; answer to ``reply_to``. With none
    idle, wait up to ``wait_s`` for one the pool is starting (a burst), then NoIdleWorker."""

    trigger_id: int
    room_name: str
    reply_to: ActorRef = field(compare=False)  # the DispatchActor's
    wait_s: float = 0.0


@dataclass(frozen=True)
class Leased:
    trigger_id: int
    client_id: str
    worker_id: str
    agent_name: str
    status: StatusAddress  # the worker's status port, with its token
    lease_id: str  # the worker accepts only a job that carries this id
    project: LiveKitSettings = field(repr=False)  # the LiveKit project this worker registered with


@dataclass(frozen=True)
class NoIdleWorker:
    trigger_id: int
    client_id: str


@dataclass(frozen=True)
class ReturnLease:
    """The dispatch failed and the worker released its claim: it may serve the next one."""

    worker_id: str
    lease_id: str


@dataclass(frozen=True)
class LeaseFailed:
    """The handoff to this worker failed: ``unregistered`` (it lost LiveKit), ``claimed``
    (an earlier pool incarnation leased it) or ``not_accepted`` (its dispatch was deleted)."""

    worker_id: str
    lease_id: str
    cause: LeaseFailure


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
    waiting: int = 0  # leases queued for a worker being started (a burst)
    running: bool = True  # False: a client at zero whose pool is stopped until its next trigger

    @classmethod
    def stopped(cls, client_id: str, min_idle: int, max_size: int) -> PoolStats:
        """What a client at zero without a pool looks like: nothing at all."""
        return cls(client_id, 0, 0, 0, 0, min_idle, max_size, 0, 0, 0.0, (), running=False)

    @property
    def total(self) -> int:
        """Live workers: the draining ones are on their way out."""
        return self.starting + self.idle + self.leased

    @property
    def utilization(self) -> float:
        return self.leased / self.total if self.total else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "pool": "running" if self.running else "stopped",
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
            "waiting": self.waiting,
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


DrainCause = Literal["removed", "shutdown", "idle"]


@dataclass(frozen=True)
class Drain:
    """The pool is going: stop idle workers now, leased ones after their session, then stop.
    ``why``: the client was ``removed``, the runtime is shutting down (``shutdown``), or
    the pool was at rest (``idle``: it starts again on its client's next trigger)."""

    why: DrainCause = "removed"


@dataclass(frozen=True)
class EndSessions:
    """End every session of this pool now; each agent says ``reason`` to its caller first."""

    reason: str


@dataclass(frozen=True)
class Tick:
    """A timer fired: reconcile again (a start backoff ended, a lost worker timed out)."""


@dataclass(frozen=True)
class CheckLease:
    """A lease is this old: has its worker received the job? If not, the dispatch was lost."""

    worker_id: str
    lease_no: int  # which lease of this worker the timer was set for


@dataclass(frozen=True)
class LeaseUnused:
    """The leased worker never got its job: retire it rather than strand it."""

    worker_id: str
    lease_no: int


@dataclass(frozen=True)
class Crash:
    """Fault injection for tests: the pool raises, as if it had a bug."""


# Sent by a pool's helper threads back into its own mailbox.


@dataclass(frozen=True)
class ListWorkers:
    """To a pool still adopting: list its workers again (the last listing failed)."""


@dataclass(frozen=True)
class Adopted:
    """The workers a previous incarnation of this pool left running, listed on a helper
    thread (a swarm backend asks the manager once per worker); ``error``: the listing failed."""

    handles: tuple[WorkerHandle, ...]
    error: str | None = None


@dataclass(frozen=True)
class WorkerStarted:
    worker_id: str
    handle: WorkerHandle


@dataclass(frozen=True)
class WorkerStatus:
    """A worker's status port changed: registered with LiveKit or not, and its own state."""

    worker_id: str
    registered: bool
    state: ReportedState
    lease_id: str | None = None
    session: Milestones = Milestones()


@dataclass(frozen=True)
class WorkerStartFailed:
    worker_id: str
    reason: str
    started: bool  # a process or container exists (it never registered) and must be stopped


@dataclass(frozen=True)
class WorkerExited:
    worker_id: str
    exit_code: int
    oom: bool = False  # the kernel killed it for its memory limit (its cgroup says so)


# -- DispatchActor -------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerRequest:
    client_id: str
    agent: str
    room_name: str
    user_email: str | None = None
    context: dict[str, Any] | None = None
    conversation_id: str | None = None


@dataclass(frozen=True)
class Trigger:
    request: TriggerRequest
    client: ClientSettings
    reply: Reply = field(compare=False)
    session_id: str  # names its session record (and the 200's session_id): random, never reused
    received_at: float = 0.0  # Unix seconds, when the gateway read it


@dataclass(frozen=True)
class TriggerResult:
    """What the gateway turns into an HTTP response."""

    status: int
    body: dict[str, Any]
    retry_after_s: int | None = None


@dataclass(frozen=True)
class LeaseTimeout:
    """The pool did not answer this attempt's Lease in time (it may be restarting)."""

    trigger_id: int
    attempt: int


@dataclass(frozen=True)
class HandoffDone:
    """The claim, dispatch and accept came back (runtime/livekit/handoff.py, on the LiveKit loop)."""

    trigger_id: int
    lease: Leased
    handoff: Handoff


RoomEventKind = Literal["room_finished", "participant_left"]


@dataclass(frozen=True)
class RoomEvent:
    """A verified LiveKit webhook about a room this client's sessions may be in."""

    client_id: str
    room_name: str
    event: RoomEventKind


@dataclass(frozen=True)
class PoolIdle:
    """From a pool at rest (no worker, nothing waiting) past its idle grace: the dispatcher,
    the only one that sends it leases, may have it stopped (see actors/dispatch.py)."""

    client_id: str
    pool: ActorRef = field(compare=False)


@dataclass(frozen=True)
class PoolRested:
    """The supervisor's answer to the dispatcher's stop of a pool at rest: ``stopped`` is
    False when it kept the pool (a reload raised its client above min_idle 0 meanwhile)."""

    client_id: str
    pool: ActorRef = field(compare=False)
    stopped: bool


@dataclass(frozen=True)
class PoolStarted:
    """The supervisor answered a StartChild the dispatcher asked for: ``ok`` if the pool runs."""

    client_id: str
    ok: bool


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


@dataclass(frozen=True)
class PoolStatsReport:
    """A pool's answer to the scaler's GetStats."""

    client_id: str
    stats: PoolStats


# -- Supervisor ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildFailed:
    child_id: str
    error: str
    ref: ActorRef | None = None  # which incarnation crashed (None: its start failed, there is none)


@dataclass(frozen=True)
class RestartChild:
    """To the supervisor itself: start this failed child again (counted already)."""

    child_id: str


@dataclass(frozen=True)
class ChildStopped:
    """A child stopped on purpose (a drained pool); ``ref`` tells incarnations apart."""

    child_id: str
    ref: ActorRef


@dataclass(frozen=True)
class StartChild:
    """Start this child unless it runs already; ``reply`` then gets its ref, or None if it
    could not start (the runtime is shutting down, the supervisor gave up, its start failed)."""

    spec: ChildSpec
    reply: Callable[[ActorRef | None], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StopChild:
    """Stop this child. With ``ref``, only if that incarnation still runs; with
    ``only_if``, only if it still says yes on the supervisor's thread (a pool at rest whose
    client was raised above min_idle 0 meanwhile stays). ``reply`` gets whether it stopped."""

    child_id: str
    graceful: bool = True  # a pool drains (sessions finish) instead of stopping at once
    why: DrainCause = "removed"  # what the draining child is told (a shutdown says "shutdown")
    ref: ActorRef | None = field(default=None, compare=False)
    only_if: Callable[[], bool] | None = field(default=None, compare=False)
    reply: Callable[[bool], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DrainChildren:
    """The runtime is shutting down: every child whose id starts with ``prefix`` drains
    (its sessions finish), none of them starts again, and ``on_drained()`` runs once, in
    the supervisor's thread, when the last of them has stopped."""

    prefix: str
    on_drained: Callable[[], None] = field(compare=False)


@dataclass(frozen=True)
class ShutdownAll:
    """Stop every child, last started first, each within its shutdown timeout."""
