"""The slow half of a pool: starting, probing and waiting on workers, in helper threads.

Everything here blocks (a container start takes seconds, ``wait`` blocks for a session's
whole length), so none of it runs in a pool's mailbox. Results go back as messages. If the
pool died meanwhile (the supervisor restarts it, and the new one adopts what it finds),
the message is dropped, except that a worker started for a dead pool is stopped again, as
the new pool could not have seen it: no orphans.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import Executor
from typing import Any

import pykka

from actors.messages import Adopted, LeaseUnused, WorkerExited, WorkerStarted, WorkerStartFailed, WorkerStatus
from actors.status_debounce import Debounce
from agent.contract import StatusAddress, read_status  # read_status: used here, and by tests
from runtime.backends.base import WorkerBackend, WorkerHandle, WorkerSpec

logger = logging.getLogger("autonomite.pool")

PROBE_INTERVAL_S = 0.05  # until a starting worker's status port answers
FOLLOW_INTERVAL_S = 0.25  # between failed probes of a worker that answered before
RESEND_S = 2.0  # what a worker says is told again this often, changed or not: a pool that
# set a worker aside on a failed claim learns that it is fine again. Also the long poll's
# length: a worker's status answers at once when it changes, else after this long.
SILENT_PROBES = 3  # a ready worker that answers none of this many probes counts as unregistered


def tell(ref: pykka.ActorRef[Any], message: object) -> bool:
    try:
        ref.tell(message)
        return True
    except pykka.ActorDeadError:
        return False


def start_worker(
    executor: Executor, backend: WorkerBackend, spec: WorkerSpec, pool: pykka.ActorRef[Any], ready_timeout_s: float,
    token: str,
) -> None:
    def run() -> None:
        try:
            handle = backend.start(spec)
        except Exception as e:  # noqa: BLE001 - any backend failure is a failed start
            tell(pool, WorkerStartFailed(spec.worker_id, str(e), started=False))
            return
        if not tell(pool, WorkerStarted(spec.worker_id, handle)):
            backend.stop(handle)
            return
        adopt_worker(backend, handle, pool, ready_timeout_s, token)

    executor.submit(run)


def adopt_worker(
    backend: WorkerBackend, handle: WorkerHandle, pool: pykka.ActorRef[Any], ready_timeout_s: float, token: str
) -> None:
    """Follow a running worker in a thread of its own (for its whole life: not the executor's)."""
    address = StatusAddress(handle.status_host, handle.status_port, token)
    threading.Thread(
        target=_follow, args=(backend, handle, address, pool, ready_timeout_s), name=f"follow-{handle.worker_id}",
        daemon=True,
    ).start()


def list_workers(executor: Executor, backend: WorkerBackend, client_id: str, pool: pykka.ActorRef[Any]) -> None:
    """The client's running workers, listed off the pool's thread; told back as Adopted."""

    def run() -> None:
        try:
            tell(pool, Adopted(tuple(backend.list(client_id))))
        except Exception as e:  # noqa: BLE001 - told to the pool, which fails with it (and is restarted)
            tell(pool, Adopted((), f"{type(e).__name__}: {e}"))

    executor.submit(run)


def stop_worker(executor: Executor, backend: WorkerBackend, handle: WorkerHandle) -> None:
    executor.submit(backend.stop, handle)


def _follow(
    backend: WorkerBackend, handle: WorkerHandle, address: StatusAddress, pool: pykka.ActorRef[Any], ready_timeout_s: float
) -> None:
    """Wait for the worker's exit in a thread of its own; meanwhile probe it for its whole
    life and tell the pool whenever what it says changes (registered, state, lease)."""
    exited = threading.Event()

    def wait_for_exit() -> None:
        code = backend.wait(handle)
        exited.set()
        cause = getattr(backend, "exit_cause", lambda _: None)(handle)  # a backend may know why
        tell(pool, WorkerExited(handle.worker_id, code, oom=cause == "oom"))

    threading.Thread(target=wait_for_exit, name=f"wait-{handle.worker_id}", daemon=True).start()
    deadline = time.monotonic() + ready_timeout_s
    debounce = Debounce(RESEND_S, SILENT_PROBES)
    etag = None
    while not exited.is_set() and pool.is_alive():  # a dead pool's successor probes for itself
        # A long poll: the answer comes when the status changes, or after RESEND_S.
        status = read_status(address, wait=RESEND_S, since=etag)
        etag = status.get("etag") if status is not None else None
        long_polled = etag is not None  # else (no answer, or a worker without long polls) pace ourselves
        told = debounce.heard(status, time.monotonic())
        if told is not None:
            tell(pool, WorkerStatus(handle.worker_id, *told))
        if debounce.last is not None and debounce.last[1] == "draining":
            return  # on its way out: the exit will be reported
        if not debounce.ever_registered and time.monotonic() > deadline:
            tell(pool, WorkerStartFailed(handle.worker_id, f"not registered within {ready_timeout_s:g} s", started=True))
            return
        if not long_polled:
            exited.wait(FOLLOW_INTERVAL_S if debounce.ever_registered else PROBE_INTERVAL_S)


def check_job_arrived(
    executor: Executor, address: StatusAddress, worker_id: str, lease_no: int, pool: pykka.ActorRef[Any]
) -> None:
    def run() -> None:
        status = read_status(address)
        if status is not None and status.get("job_id") is None:
            tell(pool, LeaseUnused(worker_id, lease_no))

    executor.submit(run)


def end_session(executor: Executor, address: StatusAddress, worker_id: str, reason: str) -> None:
    """Ask a worker to end its session, its agent saying ``reason`` to the caller first."""

    def run() -> None:
        query = urllib.parse.urlencode({"reason": reason, "say": "1"})
        request = urllib.request.Request(address.url(f"/end?{query}"), method="POST", headers=address.headers())
        try:
            with urllib.request.urlopen(request, timeout=2.0):
                pass
        except (OSError, ValueError) as e:  # over already, or gone: its exit is reported anyway
            logger.info("ending the session of %s: %s", worker_id, e)

    executor.submit(run)
