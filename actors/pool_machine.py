"""A pool's decisions as a pure state machine: no threads, no I/O, no clock of its own.

The PoolActor feeds it events (a lease, a probe's answer, an exit, a reload, a resize)
and applies the effects that :meth:`PoolMachine.reconcile` hands back: start a worker,
stop one, wake me at this time, tell the dispatcher a session ended. Everything that
*decides* lives here (reconcile, retire, adopt, backoff, clamp, the rolling replacement
on reload), so it is unit-tested in milliseconds against plain data
(``tests/unit/test_pool_machine.py``).

A worker moves ``starting -> idle -> leased -> gone``, or to ``draining`` when the pool
retires it. It is idle only while its own status says it is registered with LiveKit; a
worker that loses its registration (LiveKit restarted) goes back to ``starting`` until
it registers again. A lease that finds no idle worker may *wait* for one the pool is
starting (a burst): waiters are served first come, first served, each until its
deadline. The effects it returns are in ``actors/pool_effects.py``. Owned by one
PoolActor's thread; never shared.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.pool_effects import (  # the effects are this machine's output
    AtRest,
    BecameReady,
    CheckLeaseAt,
    Drained,
    Effect,
    ExitCause,
    Exited,
    GaveUp,
    Granted,
    LeaseFailure,
    LostRegistration,
    SessionOver,
    Spawn,
    StartFailed,
    Stop,
    WakeAt,
    WorkerState,
)
from agent.contract import ReportedState

MAX_BACKOFF_S = 30.0


def _new_id() -> str:
    """Random, so ids never repeat across pool restarts (the backend keys on them)."""
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Waiter:
    """A lease waiting for a worker that is being started; its lease id is its ticket."""

    lease_id: str
    deadline: float


@dataclass
class Worker:
    id: str
    agent_name: str
    config_fp: str
    state: WorkerState = "starting"
    started_at: float = 0.0
    ready_at: float = 0.0
    retire_cause: ExitCause | None = None  # why the pool stopped it, for the exit metric
    lease_id: str | None = None
    lease_no: int = 0  # how many leases it had (0 or 1: a worker serves one session)
    adopting: bool = False  # found running when the pool started; its state is not known yet
    lost_at: float | None = None  # when a ready worker lost its LiveKit registration


@dataclass
class PoolMachine:
    client_id: str
    min_idle: int
    max_size: int
    config_fp: str
    lease_timeout_s: float = 60.0
    lost_timeout_s: float = 60.0  # a worker unregistered this long is replaced
    rest_after_s: float | None = None  # at rest this long: say AtRest (None: never)
    workers: dict[str, Worker] = field(default_factory=dict)
    waiters: list[Waiter] = field(default_factory=list)  # first come, first served
    target: int = -1  # set from min_idle below
    missed_total: int = 0
    failures: int = 0  # consecutive failed starts
    last_error: str | None = None
    next_start_at: float = 0.0
    leaving: ExitCause | None = None  # draining: why its workers stop ("removed" or "shutdown")
    new_id: Callable[[], str] = _new_id
    rest_since: float | None = None  # when the pool last came to rest (see _note_rest)
    _outbox: list[Effect] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target < 0:
            self.target = self.min_idle

    # -- events ----------------------------------------------------------------------------

    def adopt(self, worker_id: str, agent_name: str, config_fp: str, now: float) -> None:
        """A worker a previous incarnation of this pool left running; its probe will tell."""
        self.workers[worker_id] = Worker(worker_id, agent_name, config_fp, started_at=now, adopting=True)

    def lease(self, lease_id: str, now: float) -> Worker | None:
        """Take an idle worker: fresh settings first, then the longest idle. None is a miss
        (the scaler reads ``missed_total``), even if the caller then waits."""
        self.rest_since = None  # a trigger came: the idle grace starts again (see _note_rest)
        worker = self._best_idle()
        if worker is None or self.leaving or self.waiters:  # nobody jumps the queue
            self.missed_total += 1
            return None
        self._mark_leased(worker, lease_id, now)
        return worker

    def wait(self, lease_id: str, now: float, deadline: float) -> bool:
        """After a miss: queue for a worker that is starting or can be started, if one can
        come for this waiter (within ``max_size``, and no start backoff past the deadline).
        It is answered by a :class:`Granted` or :class:`GaveUp` effect."""
        if self.leaving or deadline <= now:
            return False
        if any(w.lost_at is not None for w in self._live()):  # LiveKit is unreachable: fail fast,
            return False  # as a worker started now would not register either
        starting = self.count("starting")
        room = self.max_size - len(self._live())
        if starting + room <= len(self.waiters):
            return False
        if not starting and self.next_start_at > deadline:
            return False
        self.waiters.append(Waiter(lease_id, deadline))
        self._outbox.append(WakeAt(deadline))
        return True

    def return_lease(self, worker_id: str, lease_id: str) -> None:
        """The dispatch failed before any job existed, and the worker released its claim."""
        worker = self.workers.get(worker_id)
        if worker and worker.state == "leased" and worker.lease_id == lease_id:
            worker.state, worker.lease_id = "idle", None

    def lease_failed(self, worker_id: str, lease_id: str, cause: LeaseFailure, now: float) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.lease_id != lease_id or worker.state != "leased":
            return
        if cause == "unregistered":  # it lost LiveKit since its last probe: idle once it is back
            worker.state, worker.lease_id = "starting", None
        elif cause == "claimed":  # leased by an earlier incarnation of this pool: leave it be
            worker.lease_id = None
        else:  # dispatched but never accepted: it cannot be trusted with the next caller
            self._retire(worker, "lease_unused")

    def lease_unused(self, worker_id: str, lease_no: int) -> None:
        """The lease timer fired and the worker says it has no job."""
        worker = self.workers.get(worker_id)
        if worker and worker.state == "leased" and worker.lease_no == lease_no:
            self._retire(worker, "lease_unused")

    def resize(self, target: int) -> None:
        self.target = self._clamp(target)

    def reconfigure(self, min_idle: int, max_size: int, config_fp: str) -> None:
        """New settings: stale idle workers are replaced by :meth:`reconcile`, rolling."""
        self.min_idle, self.max_size, self.config_fp = min_idle, max_size, config_fp
        self.target = self._clamp(self.target)

    def drain(self, cause: ExitCause = "removed") -> None:
        """The pool is going (its client was removed, or the runtime shuts down): idle and
        starting workers stop now, leased ones once their session ends."""
        self.leaving = cause

    def started(self, worker_id: str) -> bool:
        """The backend started it; False means stop it at once (retired or unknown meanwhile)."""
        worker = self.workers.get(worker_id)
        return worker is not None and worker.state != "draining"

    def status(self, worker_id: str, registered: bool, reported: ReportedState, lease_id: str | None, now: float) -> None:
        """What the worker's status port says (on every change, and again every few seconds)."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.state == "draining":
            return
        taken = reported in ("claimed", "busy")
        if reported == "draining":  # on its way out by itself: nobody may lease it
            if worker.state != "leased":
                worker.state = "draining"
        elif worker.state == "starting" and registered:
            if not worker.ready_at:  # its first registration, not a return after a lost one
                self.failures, self.last_error = 0, None
                self._outbox.append(BecameReady(worker_id, 0.0 if worker.adopting else now - worker.started_at))
                worker.ready_at = now
            worker.adopting, worker.lost_at = False, None
            if taken:  # adopted mid-session, or claimed by an earlier incarnation of this pool
                self._mark_leased(worker, lease_id, now)
            else:
                worker.state = "idle"
        elif worker.state == "idle" and taken:
            self._mark_leased(worker, lease_id, now)
        elif worker.state == "idle" and not registered:
            worker.state, worker.lost_at = "starting", now
            self._outbox.append(LostRegistration(worker_id))
            self._outbox.append(WakeAt(now + self.lost_timeout_s))

    def start_failed(self, worker_id: str, reason: str, started: bool, now: float) -> None:
        """It never registered. ``started``: a process or container exists and must be stopped."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        self._back_off(worker_id, reason, now)
        if started:
            self._retire(worker, "start_failed")
        else:
            del self.workers[worker_id]
            self._outbox.append(Exited(worker_id, "start_failed", -1))

    def exited(self, worker_id: str, exit_code: int, now: float, oom: bool = False) -> None:
        """``oom``: killed for its memory limit, whatever it was doing (a start that dies so
        backs off like any failed start: a limit too small for the agent must not loop)."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        cause: ExitCause
        if oom:
            cause = "oom"
            if worker.state == "starting" and not worker.ready_at and not worker.adopting:
                self._back_off(worker_id, "killed at its memory limit before registering", now)
        elif worker.retire_cause:
            cause = worker.retire_cause
        elif worker.state == "leased":
            cause = "session_end" if exit_code == 0 else "session_failed"
        elif worker.state == "starting" and not worker.ready_at and not worker.adopting:
            cause = "start_failed"
            self._back_off(worker_id, f"exited with code {exit_code} before registering", now)
        else:
            cause = "crashed"
        self._outbox.append(Exited(worker_id, cause, exit_code))
        if worker.lease_no:  # it held a lease: the dispatcher forgets it and cleans up a failure
            self._outbox.append(SessionOver(worker_id, failed=cause != "session_end"))

    # -- the pool's size -------------------------------------------------------------------

    def desired(self) -> int:
        """Live workers to keep: the scaler's target, but always ``min_idle`` beside the leased."""
        if self.leaving:
            return 0
        leased = sum(1 for w in self.workers.values() if w.state == "leased")
        return min(self.max_size, max(self.target, leased + len(self.waiters) + self.min_idle))

    def reconcile(self, now: float) -> list[Effect]:
        """Bring the pool towards its desired size; return every effect due since last time."""
        self._serve_waiters(now)
        if self.leaving:
            for w in self._live():
                # An adopted worker may be mid-session until its probe says: not yet.
                if w.state != "leased" and not w.adopting:
                    self._retire(w, self.leaving)
            if not self.workers:
                self._outbox.append(Drained())
            return self._take()

        for w in self._live():  # lost LiveKit and never came back: replace it
            if w.lost_at is not None and now - w.lost_at >= self.lost_timeout_s:
                self._retire(w, "lost_livekit")
        live = self._live()
        stale = [w for w in live if w.state != "leased" and w.config_fp != self.config_fp]
        for w in stale:
            if w.state == "starting" and not w.adopting:  # not serving anyone yet: replace now
                self._retire(w, "reconfigured")
        stale = [w for w in stale if w.state == "idle"]
        fresh = [w for w in self._live() if w not in stale]
        desired = self.desired()

        need = desired - len(fresh)
        if need > 0:
            room = self.max_size - len(fresh) - len(stale)
            if room < need:  # no room to surge: make it by retiring stale idle workers
                for w in sorted(stale, key=lambda w: w.ready_at)[: need - room]:
                    self._retire(w, "reconfigured")
                    stale.remove(w)
                    room += 1
            if now < self.next_start_at:
                self._outbox.append(WakeAt(self.next_start_at))
            else:
                for _ in range(min(need, room)):
                    self._spawn(now)
        elif len(fresh) > desired and not any(w.adopting for w in fresh):
            # (While an adopted worker's state is unknown it may be mid-session, which would
            # raise ``desired``: shrink only once every probe has answered.)
            # Starting workers go first (not useful yet), then the most recently ready idle ones.
            spare = sorted((w for w in fresh if w.state != "leased"), key=lambda w: (w.state != "starting", -w.ready_at))
            for w in spare[: len(fresh) - desired]:
                self._retire(w, "scaled_down")

        # Stale idle workers go one by one, once the fresh ones reached the desired size and
        # idle capacity stays at min_idle without them: a reload never drops idle below it.
        fresh_now = [w for w in self._live() if w not in stale]
        idle = sum(1 for w in self._live() if w.state == "idle")
        for w in sorted(stale, key=lambda w: w.ready_at):
            if len(fresh_now) >= desired and idle - 1 >= self.min_idle:
                self._retire(w, "reconfigured")
                idle -= 1
        self._note_rest(now)
        return self._take()

    def _note_rest(self, now: float) -> None:
        """At rest: no worker at all, no lease waiting, and nothing to keep (min_idle and
        the scaler's target both 0). After ``rest_after_s`` of it, say AtRest; said again
        after as long if the pool is still there (its stop was put off: a trigger came)."""
        if self.rest_after_s is None or self.workers or self.waiters or self.desired() > 0:
            self.rest_since = None
            return
        if self.rest_since is None:
            self.rest_since = now
        due = self.rest_since + self.rest_after_s
        if now >= due:
            self._outbox.append(AtRest())
            self.rest_since, due = now, now + self.rest_after_s
        self._outbox.append(WakeAt(due))

    # -- what the pool looks like ------------------------------------------------------------

    def count(self, state: WorkerState) -> int:
        return sum(1 for w in self.workers.values() if w.state == state)

    def backoff_s(self, now: float) -> float:
        return max(0.0, round(self.next_start_at - now, 3))

    # -- internals -------------------------------------------------------------------------

    def _serve_waiters(self, now: float) -> None:
        """Refuse the waiters whose time is up, then hand idle workers to the rest, in order."""
        for waiter in [w for w in self.waiters if self.leaving or w.deadline <= now]:
            self.waiters.remove(waiter)
            self._outbox.append(GaveUp(waiter.lease_id))
        while self.waiters and (worker := self._best_idle()) is not None:
            waiter = self.waiters.pop(0)
            self._mark_leased(worker, waiter.lease_id, now)
            self._outbox.append(Granted(waiter.lease_id, worker.id))

    def _best_idle(self) -> Worker | None:
        idle = [w for w in self.workers.values() if w.state == "idle"]
        return min(idle, key=lambda w: (w.config_fp != self.config_fp, w.ready_at)) if idle else None

    def _live(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state in ("starting", "idle", "leased")]

    def _clamp(self, target: int) -> int:
        return max(self.min_idle, min(target, self.max_size))

    def _mark_leased(self, worker: Worker, lease_id: str | None, now: float) -> None:
        worker.state, worker.lease_id = "leased", lease_id
        worker.lease_no += 1
        self._outbox.append(CheckLeaseAt(worker.id, worker.lease_no, now + self.lease_timeout_s))

    def _spawn(self, now: float) -> None:
        worker_id = self.new_id()
        agent_name = f"{self.client_id}--{worker_id}"
        self.workers[worker_id] = Worker(worker_id, agent_name, self.config_fp, started_at=now)
        self._outbox.append(Spawn(worker_id, agent_name))

    def _retire(self, worker: Worker, cause: ExitCause) -> None:
        if worker.state == "draining":
            return
        worker.state, worker.retire_cause = "draining", cause
        self._outbox.append(Stop(worker.id))

    def _back_off(self, worker_id: str, reason: str, now: float) -> None:
        """Consecutive failed starts delay the next one: a bad image must not crash-loop."""
        self.failures += 1
        self.last_error = reason
        backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** (self.failures - 1))
        self.next_start_at = now + backoff
        self._outbox.append(StartFailed(worker_id, reason, backoff))

    def _take(self) -> list[Effect]:
        effects, self._outbox = self._outbox, []
        return effects
