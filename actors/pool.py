"""PoolActor: one per client. Owns that client's warm workers and its credentials.

A worker moves starting -> idle -> leased -> gone, or to draining when the pool retires
it. It is idle only once registered with the client's LiveKit (a dispatch to an
unregistered name is dropped). Leases are exact because only this mailbox flips a worker
from idle to leased. A worker serves one session and exits; the pool then refills.

The pool keeps ``max(target, leased + min_idle)`` live workers, capped at ``max_size``.
The scaler moves ``target``; the pool itself only guarantees the idle floor, at once, so
a burst of leases is refilled without waiting for the next scaler tick. Shrinking stops
idle or starting workers only: a leased worker is never stopped by a resize.

Everything slow (starting, stopping, probing, waiting) runs in helper threads
(``actors/_watch.py``) and comes back as messages, so a Lease is answered in microseconds
even while containers start.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

from actors import _watch
from actors.messages import (
    CheckLease,
    Crash,
    Drain,
    GetStats,
    Lease,
    Leased,
    LeaseUnused,
    NoIdleWorker,
    PoolStats,
    Reconfigure,
    Resize,
    ReturnLease,
    SessionEnded,
    Tick,
    WorkerExited,
    WorkerInfo,
    WorkerReady,
    WorkerStarted,
    WorkerStartFailed,
    WorkerState,
)
from actors.supervisor import Supervised
from agent.worker import WorkerConfig
from runtime.backends.base import WorkerBackend, WorkerHandle, WorkerSpec
from runtime.devserver import free_port
from runtime.metrics import WORKER_STATES, Metrics
from runtime.secrets import fingerprint
from runtime.settings import ClientSettings, WorkerSettings

logger = logging.getLogger("autonomite.pool")

MAX_BACKOFF_S = 30.0


@dataclass
class _Worker:
    id: str
    agent_name: str
    status_port: int
    config_fp: str
    state: WorkerState = "starting"
    handle: WorkerHandle | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    retire_cause: str | None = None  # why the pool stopped it, for the exit metric
    lease_no: int = 0
    adopting: bool = False  # found running at start; its state is not known yet

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.id, self.state, self.agent_name, self.handle.ref if self.handle else "")


def config_fingerprint(client: ClientSettings) -> str:
    """Changes when the credentials or the agent catalog change: then idle workers are stale."""
    catalog = json.dumps([a.for_worker() for a in client.agents], sort_keys=True)
    return fingerprint(client.livekit.fingerprint + catalog + str(client.knowledge_dir))


class PoolActor(Supervised):
    def __init__(
        self,
        client: ClientSettings,
        backend: WorkerBackend,
        settings: WorkerSettings,
        metrics: Metrics,
        executor: Executor,
        on_session_end: Callable[[SessionEnded], None] = lambda _: None,
        supervisor=None,  # noqa: ANN001
        child_id: str = "",
    ) -> None:
        super().__init__(supervisor, child_id)
        self.on_session_end = on_session_end
        self.client = client
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.workers: dict[str, _Worker] = {}
        self.target = client.pool.min_idle
        self.missed_total = 0
        self.failures = 0
        self.last_error: str | None = None
        self.next_start_at = 0.0
        self.retry_timer = None
        self.leaving = False

    def setup(self) -> None:
        """Adopt the workers a previous incarnation of this pool left running."""
        self.config_fp = config_fingerprint(self.client)
        for handle in self.backend.list(self.client.id):
            w = _Worker(handle.worker_id, handle.agent_name, handle.status_port, handle.credentials_fp, handle=handle)
            w.started_at, w.adopting = time.monotonic(), True
            self.workers[w.id] = w
            _watch.adopt_worker(self.executor, self.backend, handle, self.actor_ref, self.settings.ready_timeout_s)
        if self.workers:
            logger.info("pool %s adopted %d live workers", self.client.id, len(self.workers))
        self._reconcile()

    def on_receive(self, message: object) -> object:
        match message:
            case Lease():
                result = self._lease(message)
            case ReturnLease(worker_id):
                result = self._return_lease(worker_id)
            case CheckLease(worker_id, lease_no):
                result = self._check_lease(worker_id, lease_no)
            case LeaseUnused(worker_id):
                result = self._lease_unused(worker_id)
            case Resize(target, _):
                result = self._resize(target)
            case GetStats(reply):
                result = self._stats()
                if reply is not None:
                    reply(result)
            case Reconfigure(client):
                result = self._reconfigure(client)
            case Drain():
                result = self._drain()
            case Tick():
                result = None
            case WorkerStarted(worker_id, handle):
                result = self._started(worker_id, handle)
            case WorkerReady(worker_id, busy):
                result = self._ready(worker_id, busy)
            case WorkerStartFailed(worker_id, reason):
                result = self._start_failed(worker_id, reason)
            case WorkerExited(worker_id, exit_code):
                result = self._exited(worker_id, exit_code)
            case Crash():
                raise RuntimeError(f"injected crash in pool {self.client.id}")
            case _:
                raise TypeError(f"pool: unexpected message {type(message).__name__}")
        self._reconcile()
        return result

    # -- the mailbox ---------------------------------------------------------------------

    def _lease(self, message: Lease) -> Leased | NoIdleWorker:
        idle = [w for w in self.workers.values() if w.state == "idle"]
        if not idle or self.leaving:
            self.missed_total += 1
            return NoIdleWorker(self.client.id)
        worker = min(idle, key=lambda w: w.ready_at)  # longest-idle first
        worker.state = "leased"
        worker.lease_no += 1
        _watch.after(self.settings.lease_timeout_s, self.actor_ref, CheckLease(worker.id, worker.lease_no))
        logger.info("pool %s leased %s for room %s", self.client.id, worker.id, message.room_name)
        return Leased(self.client.id, worker.id, worker.agent_name)

    def _return_lease(self, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker and worker.state == "leased":
            worker.state = "idle"

    def _check_lease(self, worker_id: str, lease_no: int) -> None:
        worker = self.workers.get(worker_id)
        if worker and worker.state == "leased" and worker.lease_no == lease_no:
            _watch.check_job_arrived(self.executor, worker.status_port, worker_id, self.actor_ref)

    def _lease_unused(self, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker and worker.state == "leased":
            logger.warning("pool %s: worker %s got no job within its lease timeout; retiring it", self.client.id, worker_id)
            self._retire(worker, "lease_unused")

    def _resize(self, target: int) -> None:
        self.target = max(self.client.pool.min_idle, min(target, self.client.pool.max_size))

    def _stats(self) -> PoolStats:
        count = {s: 0 for s in WORKER_STATES}
        for w in self.workers.values():
            count[w.state] += 1
        return PoolStats(
            client_id=self.client.id,
            starting=count["starting"],
            idle=count["idle"],
            leased=count["leased"],
            draining=count["draining"],
            min_idle=self.client.pool.min_idle,
            max_size=self.client.pool.max_size,
            target=self.target,
            missed_total=self.missed_total,
            backoff_s=max(0.0, round(self.next_start_at - time.monotonic(), 3)),
            workers=tuple(w.info() for w in self.workers.values()),
            last_error=self.last_error,
        )

    def _reconfigure(self, client: ClientSettings) -> None:
        self.client = client
        self.config_fp = config_fingerprint(client)
        self.target = max(client.pool.min_idle, min(self.target, client.pool.max_size))
        for w in list(self.workers.values()):
            if w.config_fp != self.config_fp and w.state in ("starting", "idle"):
                self._retire(w, "reconfigured")
        # Leased workers with the old settings finish their session, then exit as usual.

    def _drain(self) -> None:
        self.leaving = True
        logger.info("pool %s draining: the client was removed", self.client.id)

    def _started(self, worker_id: str, handle: WorkerHandle) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            _watch.stop_worker(self.executor, self.backend, handle)
            return
        worker.handle = handle
        if worker.state == "draining":  # retired before the backend even answered
            _watch.stop_worker(self.executor, self.backend, handle)

    def _ready(self, worker_id: str, busy: bool) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.state != "starting":
            return
        self.failures, self.last_error = 0, None
        worker.ready_at = time.monotonic()
        worker.adopting = False
        if busy:
            worker.state = "leased"  # adopted mid-session: it exits when its session ends
            return
        worker.state = "idle"
        if worker.config_fp != self.config_fp:
            self._retire(worker, "reconfigured")  # adopted with settings that changed since
            return
        self.metrics.start_to_ready.labels(self.client.id).observe(worker.ready_at - worker.started_at)
        logger.info("pool %s: worker %s ready in %.2f s", self.client.id, worker.id, worker.ready_at - worker.started_at)

    def _start_failed(self, worker_id: str, reason: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        self._back_off(worker_id, reason)
        if worker.handle is None:
            del self.workers[worker_id]  # never ran: nothing to wait for
            self.metrics.worker_exits.labels(self.client.id, "start_failed").inc()
        else:
            self._retire(worker, "start_failed")

    def _back_off(self, worker_id: str, reason: str) -> None:
        """Consecutive failed starts delay the next one: a bad image must not crash-loop."""
        self.failures += 1
        self.last_error = reason
        backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** (self.failures - 1))
        self.next_start_at = time.monotonic() + backoff
        self.metrics.worker_start_failures.labels(self.client.id).inc()
        logger.error(
            "pool %s: worker %s failed to start (%s); next start in %.1f s", self.client.id, worker_id, reason, backoff
        )

    def _exited(self, worker_id: str, exit_code: int) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        if worker.retire_cause:
            cause = worker.retire_cause
        elif worker.state == "leased":
            cause = "session_end" if exit_code == 0 else "session_failed"
        elif worker.state == "starting":
            cause = "start_failed"
            self._back_off(worker_id, f"exited with code {exit_code} before registering")
        else:
            cause = "crashed"
        self.metrics.worker_exits.labels(self.client.id, cause).inc()
        if worker.lease_no:  # it held a lease: the dispatcher forgets it, and cleans up a failure
            self.on_session_end(SessionEnded(self.client.id, worker_id, failed=cause != "session_end"))
        logger.info("pool %s: worker %s exited (%s, code %s)", self.client.id, worker_id, cause, exit_code)

    # -- keeping the pool at its size ----------------------------------------------------

    def _desired(self) -> int:
        if self.leaving:
            return 0
        leased = sum(1 for w in self.workers.values() if w.state == "leased")
        return min(self.client.pool.max_size, max(self.target, leased + self.client.pool.min_idle))

    def _reconcile(self) -> None:
        live = [w for w in self.workers.values() if w.state in ("starting", "idle", "leased")]
        desired = self._desired()
        if len(live) < desired:
            wait = self.next_start_at - time.monotonic()
            if wait > 0:
                if self.retry_timer is None or not self.retry_timer.is_alive():
                    self.retry_timer = _watch.after(wait, self.actor_ref, Tick())
            else:
                for _ in range(desired - len(live)):
                    self._spawn()
        elif len(live) > desired and not any(w.adopting for w in live):
            # (While an adopted worker's state is unknown it may be mid-session, which would
            # raise ``desired``: shrink only once every probe has answered.)
            # Starting workers go first (not useful yet), then the most recently ready idle ones.
            spare = sorted(
                (w for w in live if w.state != "leased"), key=lambda w: (w.state != "starting", -w.ready_at)
            )
            for w in spare[: len(live) - desired]:
                self._retire(w, "removed" if self.leaving else "scaled_down")
        self._publish()
        if self.leaving and not self.workers:
            logger.info("pool %s drained and stopped", self.client.id)
            self.metrics.forget_client(self.client.id)
            self.actor_ref.stop(block=False)

    def _spawn(self) -> None:
        worker_id = uuid.uuid4().hex[:8]
        worker = _Worker(
            id=worker_id,
            agent_name=f"{self.client.id}--{worker_id}",
            status_port=free_port(),
            config_fp=self.config_fp,
            started_at=time.monotonic(),
        )
        self.workers[worker_id] = worker
        spec = WorkerSpec(
            client_id=self.client.id,
            worker_id=worker_id,
            agent_name=worker.agent_name,
            status_port=worker.status_port,
            credentials_fp=self.config_fp,
            env=self._worker_env(worker),
            cpu=self.client.pool.cpu,
            memory_mb=self.client.pool.memory_mb,
            image=self.client.image or self.settings.image,
            knowledge_dir=str(self.client.knowledge_dir) if self.client.knowledge_dir else None,
        )
        _watch.start_worker(self.executor, self.backend, spec, self.actor_ref, self.settings.ready_timeout_s)

    def _worker_env(self, worker: _Worker) -> dict[str, str]:
        """Only this client's credentials and catalog: nothing of any other client."""
        lk = self.client.livekit
        config = WorkerConfig(
            worker_id=worker.id,
            client_id=self.client.id,
            agent_name=worker.agent_name,
            status_port=worker.status_port,
            catalog=[a.for_worker() for a in self.client.agents],
            user_join_timeout_s=self.settings.user_join_timeout_s,
        )
        return {
            "LIVEKIT_URL": lk.url,
            "LIVEKIT_API_KEY": lk.api_key.get_secret_value(),
            "LIVEKIT_API_SECRET": lk.api_secret.get_secret_value(),
            **config.to_env(),
        }

    def _retire(self, worker: _Worker, cause: str) -> None:
        worker.state = "draining"
        worker.retire_cause = cause
        if worker.handle is not None:
            _watch.stop_worker(self.executor, self.backend, worker.handle)

    def _publish(self) -> None:
        stats = self._stats()
        cid = self.client.id
        for state in WORKER_STATES:
            self.metrics.workers.labels(cid, state).set(getattr(stats, state))
        self.metrics.utilization.labels(cid).set(stats.utilization)
        self.metrics.min_idle.labels(cid).set(stats.min_idle)
        self.metrics.max_size.labels(cid).set(stats.max_size)
        self.metrics.target.labels(cid).set(stats.target)
        self.metrics.backoff.labels(cid).set(stats.backoff_s)

    def on_stop(self) -> None:
        """A normal stop (shutdown, not a crash): the workers go with the pool."""
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        handles = [w.handle for w in self.workers.values() if w.handle is not None]
        for f in [self.executor.submit(self.backend.stop, h) for h in handles]:
            f.result()
        self.workers.clear()
