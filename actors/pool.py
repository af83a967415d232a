"""PoolActor: one per client. Owns that client's warm workers and its credentials.

The decisions (which worker to lease, when to start, retire or back off, how to roll a
reload) are :class:`actors.pool_machine.PoolMachine`'s, a pure state machine. This actor
only feeds it the mailbox's messages and applies the effects it returns: starting and
stopping workers through the backend, timers, metrics, and telling the dispatcher.

Everything slow (starting, stopping, probing, waiting) runs in helper threads
(``actors/_watch.py``) and comes back as messages, so a Lease is answered in microseconds
even while containers start. Each worker is followed by a probe for its whole life, so
a worker that loses its LiveKit registration stops counting as idle at once.

State owned by this actor's thread: the machine, the backend handles and status ports.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import pykka

from actors import _watch, timers
from actors.messages import (
    Adopted,
    CheckLease,
    Crash,
    Drain,
    DrainCause,
    EndSessions,
    GetStats,
    Lease,
    Leased,
    LeaseFailed,
    LeaseUnused,
    ListWorkers,
    NoIdleWorker,
    PoolIdle,
    PoolStats,
    Reconfigure,
    Resize,
    ReturnLease,
    SessionEnded,
    Tick,
    WorkerExited,
    WorkerInfo,
    WorkerStarted,
    WorkerStartFailed,
    WorkerStatus,
)
from actors.pool_effects import (
    AtRest,
    BecameReady,
    CheckLeaseAt,
    Drained,
    Effect,
    ExitCause,
    Exited,
    GaveUp,
    Granted,
    LostRegistration,
    SessionOver,
    Spawn,
    StartFailed,
    Stop,
    WakeAt,
)
from actors.pool_machine import PoolMachine
from actors.supervisor import Supervised
from agent.contract import StatusAddress, WorkerConfig, status_token
from runtime.backends.base import WorkerBackend, WorkerHandle, WorkerSpec
from runtime.backends.ports import free_port
from runtime.metrics import WORKER_STATES, Metrics
from runtime.secrets import fingerprint
from runtime.sessions.log import SessionLog
from runtime.settings import ClientSettings, LiveKitSettings, WorkerSettings

logger = logging.getLogger("autonomite.pool")
LIST_RETRY_S = 1.0  # after a failed listing of the workers to adopt

_DRAIN_SAYS: dict[DrainCause, str] = {
    "removed": "the client was removed", "shutdown": "the runtime is shutting down",
    "idle": "at rest; it starts again on the client's next trigger",
}
_DRAIN_CAUSE: dict[DrainCause, ExitCause] = {"removed": "removed", "shutdown": "shutdown", "idle": "scaled_down"}


def config_fingerprint(client: ClientSettings) -> str:
    """Changes when the credentials, the agent catalog or the placement change: then idle
    workers are stale (and replaced, rolling)."""
    catalog = json.dumps([a.for_worker().to_json() for a in client.agents], sort_keys=True)
    return fingerprint(client.livekit.fingerprint + catalog + str(client.knowledge_dir) + str(client.pool.placement))


class PoolActor(Supervised):
    def __init__(
        self,
        client: ClientSettings,
        backend: WorkerBackend,
        settings: WorkerSettings,
        metrics: Metrics,
        executor: Executor,
        tell_dispatch: Callable[[object], None] = lambda _: None,
        status_key: str = "",
        rest_after_s: float | None = None,
        forget_metrics: Callable[[str], None] | None = None,
        sessions: SessionLog | None = None,
        supervisor: pykka.ActorRef[Any] | None = None,
        child_id: str = "",
    ) -> None:
        super().__init__(supervisor, child_id)
        # Where its workers' sessions and idle time are recorded (off this thread: a queue).
        self.sessions = sessions
        self.idle_clock = (time.monotonic(), 0)  # since when, how many workers were idle
        self.idle_owed = 0.0  # idle worker seconds not told yet (told a second's worth at a time)
        self.tell_dispatch = tell_dispatch  # a session ended; the pool is at rest
        # Its client's series go when it stops; the runtime's hook keeps those of a new
        # incarnation already started (woken by a trigger as this one drained).
        self.forget_metrics = forget_metrics or metrics.forget_client
        self.status_key = status_key  # workers' status tokens are derived from it (agent/contract.py)
        self.client = client
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.machine = PoolMachine(
            client.id, client.pool.min_idle, client.pool.max_size, config_fingerprint(client),
            lease_timeout_s=settings.lease_timeout_s, lost_timeout_s=settings.ready_timeout_s,
            rest_after_s=rest_after_s,  # never at rest while min_idle keeps a worker (desired > 0)
        )
        self.handles: dict[str, WorkerHandle] = {}
        self.addresses: dict[str, StatusAddress] = {}  # known once the backend started the worker
        # The LiveKit project each worker registered with: a dispatch must go there, even
        # while a reload that moved the client to another project rolls its workers over.
        self.projects: dict[str, LiveKitSettings] = {}
        self.wake_timer: timers.Timer | None = None
        self.published: tuple[float, ...] = ()  # what the gauges show (see _publish)
        self.wake_at = 0.0
        self.waiting: dict[str, Lease] = {}  # queued leases by lease id, until Granted or GaveUp
        # Until the workers a previous incarnation left are known, what the pool is told
        # waits here (but stats): deciding before would start workers beside them.
        self.deferred: list[object] | None = None

    def setup(self) -> None:
        """Adopt the workers a previous incarnation of this pool left running. Listing them
        may be slow (a swarm manager is asked once per worker), so it runs on a helper
        thread and comes back as Adopted: the mailbox never waits on it."""
        self.deferred = []
        _watch.list_workers(self.executor, self.backend, self.client.id, self.actor_ref)

    def _adopted(self, message: Adopted) -> None:
        if message.error is not None:
            # Not a crash: a restart would only list again, and count against the restart
            # intensity every pool shares (a backend blip while clients at zero are woken
            # must not stop the runtime). Leases wait meanwhile; each has its deadline.
            logger.warning("pool %s: listing its workers failed (%s); trying again in %g s", self.client.id,
                           message.error, LIST_RETRY_S)
            timers.after(LIST_RETRY_S, self.actor_ref, ListWorkers())
            return
        now = time.monotonic()
        for handle in message.handles:
            self.machine.adopt(handle.worker_id, handle.agent_name, handle.credentials_fp, now)
            self.handles[handle.worker_id] = handle
            self.addresses[handle.worker_id] = self._address(handle)
            _watch.adopt_worker(self.backend, handle, self.actor_ref, self.settings.ready_timeout_s,
                                self.addresses[handle.worker_id].token)
        if self.handles:
            logger.info("pool %s adopted %d live workers", self.client.id, len(self.handles))
        deferred, self.deferred = self.deferred or [], None
        self._apply(self.machine.reconcile(now))
        for waiting in deferred:
            self.on_receive(waiting)

    def on_receive(self, message: object) -> object:
        if isinstance(message, Adopted):
            self._adopted(message)
            return None
        if isinstance(message, ListWorkers):
            _watch.list_workers(self.executor, self.backend, self.client.id, self.actor_ref)
            return None
        if self.deferred is not None:  # still adopting: stats answer, the rest waits
            if not isinstance(message, GetStats):
                self.deferred.append(message)
                return None
            return self._answer_stats(message)
        now = time.monotonic()
        m = self.machine
        result = None
        match message:
            case Lease():
                self._lease(message, now)
            case ReturnLease(worker_id, lease_id):
                m.return_lease(worker_id, lease_id)
            case LeaseFailed(worker_id, lease_id, cause):
                logger.warning("pool %s: handoff to %s failed (%s)", self.client.id, worker_id, cause)
                m.lease_failed(worker_id, lease_id, cause, now)
            case CheckLease(worker_id, lease_no):
                if worker_id in self.addresses:
                    _watch.check_job_arrived(self.executor, self.addresses[worker_id], worker_id, lease_no, self.actor_ref)
            case LeaseUnused(worker_id, lease_no):
                logger.warning("pool %s: worker %s got no job within its lease timeout; retiring it", self.client.id, worker_id)
                m.lease_unused(worker_id, lease_no)
            case Resize(target, _):
                m.resize(target)
            case GetStats():
                result = self._answer_stats(message)
            case Reconfigure(client):
                self.client = client
                m.reconfigure(client.pool.min_idle, client.pool.max_size, config_fingerprint(client))
            case Drain(why):
                logger.info("pool %s draining: %s", self.client.id, _DRAIN_SAYS[why])
                m.drain(_DRAIN_CAUSE[why])
            case EndSessions(reason):
                self._end_sessions(reason)
            case Tick():
                pass
            case WorkerStarted(worker_id, handle):
                self.handles[worker_id], self.addresses[worker_id] = handle, self._address(handle)
                if not m.started(worker_id):  # retired before the backend even answered
                    _watch.stop_worker(self.executor, self.backend, handle)
            case WorkerStatus(worker_id, registered, state, lease_id, session):
                m.status(worker_id, registered, state, lease_id, now)
                if self.sessions is not None and session != (False, False, None):
                    self.sessions.progress(self.client.id, worker_id, session)
            case WorkerStartFailed(worker_id, reason, started):
                m.start_failed(worker_id, reason, started, now)
            case WorkerExited(worker_id, exit_code, oom):
                m.exited(worker_id, exit_code, now, oom)
                self.handles.pop(worker_id, None)
                self.addresses.pop(worker_id, None)
                self.projects.pop(worker_id, None)
            case Crash():
                raise RuntimeError(f"injected crash in pool {self.client.id}")
            case _:
                raise TypeError(f"pool: unexpected message {type(message).__name__}")
        self._apply(m.reconcile(now))
        return result

    # -- the mailbox ---------------------------------------------------------------------

    def _answer_stats(self, message: GetStats) -> PoolStats:
        stats = self._stats()
        if message.reply is not None:
            message.reply(stats)
        return stats

    def _lease(self, message: Lease, now: float) -> None:
        lease_id = uuid.uuid4().hex
        worker = self.machine.lease(lease_id, now)
        if worker is not None:
            self._answer_lease(message, worker.id)
        elif message.wait_s > 0 and self.machine.wait(lease_id, now, now + message.wait_s):
            self.waiting[lease_id] = message  # answered by a Granted or GaveUp effect
        else:
            _watch.tell(message.reply_to, NoIdleWorker(message.trigger_id, self.client.id))

    def _answer_lease(self, message: Lease, worker_id: str) -> None:
        worker = self.machine.workers[worker_id]
        logger.info("pool %s leased %s for room %s", self.client.id, worker.id, message.room_name)
        assert worker.lease_id is not None  # the machine has just leased it
        answer = Leased(
            message.trigger_id, self.client.id, worker.id, worker.agent_name, self.addresses[worker.id], worker.lease_id,
            self.projects.get(worker.id, self.client.livekit),
        )
        if not _watch.tell(message.reply_to, answer):  # the dispatcher died meanwhile
            self.machine.return_lease(worker.id, worker.lease_id)

    def _end_sessions(self, reason: str) -> None:
        leased = [w.id for w in self.machine.workers.values() if w.state == "leased" and w.id in self.addresses]
        if leased:
            logger.warning("pool %s: ending %d sessions (%s)", self.client.id, len(leased), ", ".join(leased))
        for worker_id in leased:
            _watch.end_session(self.executor, self.addresses[worker_id], worker_id, reason)

    def _stats(self) -> PoolStats:
        m, now = self.machine, time.monotonic()
        return PoolStats(
            client_id=self.client.id,
            starting=m.count("starting"),
            idle=m.count("idle"),
            leased=m.count("leased"),
            draining=m.count("draining"),
            min_idle=m.min_idle,
            max_size=m.max_size,
            target=m.target,
            missed_total=m.missed_total,
            waiting=len(m.waiters),
            backoff_s=m.backoff_s(now),
            workers=tuple(
                WorkerInfo(w.id, w.state, w.agent_name, self.handles[w.id].ref if w.id in self.handles else "")
                for w in m.workers.values()
            ),
            last_error=m.last_error,
        )

    # -- applying the machine's effects ----------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        cid = self.client.id
        for effect in effects:
            match effect:
                case Spawn(worker_id, agent_name):
                    self._spawn(worker_id, agent_name)
                case Stop(worker_id):
                    if worker_id in self.handles:  # else: stopped when WorkerStarted arrives
                        _watch.stop_worker(self.executor, self.backend, self.handles[worker_id])
                case WakeAt(at):
                    self._wake(at)
                case CheckLeaseAt(worker_id, lease_no, at):
                    timers.after(max(0.0, at - time.monotonic()), self.actor_ref, CheckLease(worker_id, lease_no))
                case SessionOver(worker_id, failed):
                    self.tell_dispatch(SessionEnded(cid, worker_id, failed))
                    if self.sessions is not None:
                        self.sessions.worker_gone(cid, worker_id, failed)
                case Exited(worker_id, cause, code):
                    self.metrics.worker_exits.labels(cid, cause).inc()
                    logger.info("pool %s: worker %s exited (%s, code %s)", cid, worker_id, cause, code)
                case StartFailed(worker_id, reason, backoff):
                    self.metrics.worker_start_failures.labels(cid).inc()
                    logger.error("pool %s: worker %s failed to start (%s); next start in %.1f s", cid, worker_id, reason, backoff)
                case BecameReady(worker_id, seconds):
                    if seconds:
                        self.metrics.start_to_ready.labels(cid).observe(seconds)
                    logger.info("pool %s: worker %s ready in %.2f s", cid, worker_id, seconds)
                case Granted(lease_id, worker_id):
                    self._answer_lease(self.waiting.pop(lease_id), worker_id)
                case GaveUp(lease_id):
                    message = self.waiting.pop(lease_id)
                    _watch.tell(message.reply_to, NoIdleWorker(message.trigger_id, cid))
                case LostRegistration(worker_id):
                    logger.warning("pool %s: worker %s lost its LiveKit registration; not idle until it is back", cid, worker_id)
                case AtRest():
                    self.tell_dispatch(PoolIdle(cid, self.actor_ref))
                case Drained():
                    logger.info("pool %s drained and stopped", cid)
                    self._count_idle(0, flush_below_s=0)  # before its series go
                    self.forget_metrics(cid)
                    self.actor_ref.stop(block=False)
                    return
        self._publish()

    def _wake(self, at: float) -> None:
        if self.wake_timer is not None and self.wake_timer.is_alive() and self.wake_at <= at:
            return
        if self.wake_timer is not None:
            self.wake_timer.cancel()
        self.wake_at = at
        self.wake_timer = timers.after(max(0.0, at - time.monotonic()), self.actor_ref, Tick())

    def _spawn(self, worker_id: str, agent_name: str) -> None:
        port = free_port()
        self.projects[worker_id] = self.client.livekit
        spec = WorkerSpec(
            client_id=self.client.id,
            worker_id=worker_id,
            agent_name=agent_name,
            status_port=port,
            credentials_fp=self.machine.config_fp,
            env=self._worker_env(worker_id, agent_name, port),
            cpu=self.client.pool.cpu,
            memory_mb=self.client.pool.memory_mb,
            pids=self.client.pool.pids,
            image=self.client.image or self.settings.image,
            knowledge_dir=str(self.client.knowledge_dir) if self.client.knowledge_dir else None,
            placement=tuple(self.client.pool.placement),
        )
        _watch.start_worker(self.executor, self.backend, spec, self.actor_ref, self.settings.ready_timeout_s,
                            self._token(worker_id))

    def _token(self, worker_id: str) -> str:
        return status_token(self.status_key, worker_id) if self.status_key else ""

    def _address(self, handle: WorkerHandle) -> StatusAddress:
        return StatusAddress(handle.status_host, handle.status_port, handle.status_token or self._token(handle.worker_id))

    def _worker_env(self, worker_id: str, agent_name: str, port: int) -> dict[str, str]:
        """Only this client's credentials and catalog: nothing of any other client."""
        project = self.client.livekit
        config = WorkerConfig(
            worker_id=worker_id,
            client_id=self.client.id,
            agent_name=agent_name,
            status_port=port,
            catalog=[a.for_worker() for a in self.client.agents],
            user_join_timeout_s=self.settings.user_join_timeout_s,
            rejoin_grace_s=self.settings.rejoin_grace_s,
            status_token=self._token(worker_id),
            orphan_timeout_s=self.settings.orphan_timeout_s,
        )
        return {
            "LIVEKIT_URL": project.url,
            "LIVEKIT_API_KEY": project.api_key.get_secret_value(),
            "LIVEKIT_API_SECRET": project.api_secret.get_secret_value(),
            **config.to_env(),
        }

    def _publish(self) -> None:
        """The pool's gauges, set only when they changed: every message ends here, and a
        storm of refused leases changes none of them."""
        stats = self._stats()
        self._count_idle(stats.idle)
        shown = (stats.starting, stats.idle, stats.leased, stats.draining, stats.utilization, stats.min_idle,
                 stats.max_size, stats.target, stats.backoff_s, self.metrics.forgotten(self.client.id))
        if shown == self.published:
            return
        self.published = shown
        cid = self.client.id
        for state in WORKER_STATES:
            self.metrics.workers.labels(cid, state).set(getattr(stats, state))
        self.metrics.utilization.labels(cid).set(stats.utilization)
        self.metrics.min_idle.labels(cid).set(stats.min_idle)
        self.metrics.max_size.labels(cid).set(stats.max_size)
        self.metrics.target.labels(cid).set(stats.target)
        self.metrics.backoff.labels(cid).set(stats.backoff_s)

    def _count_idle(self, idle: int, flush_below_s: float = 1.0) -> None:
        """Idle worker seconds: what this client's warm capacity cost (a counter, and usage)."""
        now = time.monotonic()
        since, count = self.idle_clock
        self.idle_owed += count * max(0.0, now - since)
        self.idle_clock = (now, idle)
        if self.idle_owed > 0 and self.idle_owed >= flush_below_s:  # never a 0: it would make a series
            self.metrics.idle_worker_seconds.labels(self.client.id).inc(self.idle_owed)
            if self.sessions is not None:
                self.sessions.idle(self.client.id, self.idle_owed)
            self.idle_owed = 0.0

    def on_stop(self) -> None:
        """A normal stop (shutdown or drained, not a crash): the workers go with the pool."""
        self._count_idle(0, flush_below_s=0)
        if self.wake_timer is not None:
            self.wake_timer.cancel()
        held = [m for m in self.deferred or [] if isinstance(m, Lease)]  # stopped while adopting
        for message in [*self.waiting.values(), *held]:  # queued leases are refused, not left to time out
            _watch.tell(message.reply_to, NoIdleWorker(message.trigger_id, self.client.id))
        for f in [self.executor.submit(self.backend.stop, h) for h in self.handles.values()]:
            f.result()
        self.handles.clear()
        super().on_stop()
