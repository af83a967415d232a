"""One view of a swarm's worker tasks, shared by every thread that waits on one.

Why: each warm worker has a helper thread waiting for its end (``SwarmBackend.wait``), and
each start waits for its task to be placed. Polled per worker, that is two manager calls
per worker per tick: 200 workers at 4 ticks a second make 1,600 requests a second, to
learn that nothing happened. The board lists the workers' services and the swarm's tasks
once per tick, however many wait, and each waiter reads its own service in the result.

Threads: the board's own thread (``swarm-board``) runs while anyone waits and writes the
snapshot under the condition's lock; waiters (the pool's helper threads) read it under the
same lock. What a waiter concludes from a snapshot is decided by the pure functions at the
bottom, tested without an engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import docker

from runtime.backends.base import LABEL_WORKER, short_error

logger = logging.getLogger("autonomite.swarm")

POLL_S = 0.25
ENDED = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}


@dataclass(frozen=True)
class Snapshot:
    """One listing: our services (by the 12-character id the handles carry) and the newest
    task of each. ``seq`` numbers listings in the order they began."""

    seq: int
    services: frozenset[str] = frozenset()
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict[str, Any])


class Board:
    def __init__(self, engine: Callable[[], docker.DockerClient], owner: str | None = None) -> None:
        self._engine_factory = engine
        self._labels = [LABEL_WORKER, owner] if owner else [LABEL_WORKER]  # whose services are listed
        self._cond = threading.Condition()
        self._snapshot = Snapshot(seq=0)
        self._begun = 0  # the number of the listing under way (or the last one begun)
        self._waiters = 0
        self._thread: threading.Thread | None = None
        self.listings = 0  # how many listings were made: what the manager paid

    def wait(self, decide: Callable[[Snapshot], object | None], timeout: float | None = None) -> object | None:
        """The first non-None ``decide(snapshot)``, over listings begun after this call
        (a listing begun earlier may predate the service); None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
            need = self._begun + 1
            if self._thread is None or not self._thread.is_alive():
                self._start()
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                with self._cond:
                    self._cond.wait_for(lambda: self._snapshot.seq >= need, left)  # noqa: B023 - waited on here
                    snap = self._snapshot
                if snap.seq >= need:  # decided outside the lock: deciding may ask the manager about nodes
                    decided = decide(snap)
                    if decided is not None:
                        return decided
                    need = snap.seq + 1
        finally:
            with self._cond:
                self._waiters -= 1

    def task(self, service: str) -> dict[str, Any] | None:
        """The newest task of ``service`` (its id's first 12 characters) in the last listing,
        without waiting for a new one: None if none was listed."""
        with self._cond:
            return self._snapshot.tasks.get(service)

    def _run(self) -> None:
        """List while anyone waits. Nothing ends this thread but having no waiter: a failed
        listing, or an engine that cannot even be reached, is retried with backoff."""
        engine: docker.DockerClient | None = None  # its own connection: listings never queue behind a start
        backoff = POLL_S
        try:
            while True:
                with self._cond:
                    if self._waiters == 0:
                        return
                    self._begun += 1
                    seq = self._begun
                try:
                    engine = engine or self._engine_factory()
                    snapshot = _list(engine, seq, self._labels)
                    self.listings += 1
                    backoff = POLL_S
                except Exception as e:  # noqa: BLE001 - the board must outlive any listing; waiters' deadlines stand
                    logger.warning("listing the swarm's workers: %s; retrying in %g s", short_error(e), backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                with self._cond:
                    self._snapshot = snapshot
                    self._cond.notify_all()
                time.sleep(POLL_S)
        finally:
            if engine is not None:
                engine.close()
            with self._cond:  # a waiter who came since the check above saw this thread alive:
                if self._thread is threading.current_thread():  # hand over, never strand it
                    self._thread = None
                    if self._waiters:
                        self._start()

    def _start(self) -> None:  # with the lock held
        self._thread = threading.Thread(target=self._run, name="swarm-board", daemon=True)
        self._thread.start()


def _list(engine: docker.DockerClient, seq: int, labels: list[str]) -> Snapshot:
    services = frozenset(s["ID"][:12] for s in engine.api.services(filters={"label": labels}))
    tasks: dict[str, list[dict[str, Any]]] = {}
    for task in engine.api.tasks():
        if (sid := task.get("ServiceID", "")[:12]) in services:
            tasks.setdefault(sid, []).append(task)
    return Snapshot(seq, services, {sid: newest for sid, ts in tasks.items() if (newest := current_task(ts)) is not None})


def current_task(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest task of a one-replica service (with restart ``none`` there is only one)."""
    return max(tasks, key=lambda t: t.get("CreatedAt", ""), default=None)


# -- what a waiter concludes: pure ---------------------------------------------------------


class Ended(NamedTuple):
    code: int  # the container's exit code; -1 when there is none
    why: Literal["exited", "removed", "node_down"]


class Placed(NamedTuple):
    node_id: str


class Unplaceable(NamedTuple):
    reason: str


def ended(service: str, snap: Snapshot, node_down: Callable[[str | None], bool]) -> Ended | None:
    """Whether the worker in ``service`` (its id's first 12 characters) has ended, and how; None while it runs."""
    if service not in snap.services:
        return Ended(-1, "removed")  # stopped meanwhile
    task = snap.tasks.get(service)
    if task is None:
        return None
    if task["Status"]["State"] in ENDED:
        return Ended(int(task["Status"].get("ContainerStatus", {}).get("ExitCode", -1)), "exited")
    if node_down(task.get("NodeID")):  # Swarm never ends a task on a lost node: we do
        return Ended(-1, "node_down")
    return None


def placed(service: str, snap: Snapshot, node_down: Callable[[str | None], bool]) -> Placed | Unplaceable | None:
    """Where a new worker's task runs, or why it never will; None while it is on its way."""
    task = snap.tasks.get(service)
    if service not in snap.services:
        return Unplaceable("the service was removed before its task ran")
    if task is None:
        return None
    state, err, node = task["Status"]["State"], task["Status"].get("Err", ""), task.get("NodeID")
    if state == "running" and node:
        return Placed(node)
    if state in ENDED:  # e.g. "No such image" on that node
        return Unplaceable(f"swarm task {state} on node {(node or '?')[:12]}: {err[:200]}")
    if not node and "no suitable node" in err:  # constraints or resources: the pool backs off
        return Unplaceable(f"swarm cannot place the worker: {err[:200]}")
    if node and node_down(node):  # assigned to a node that died before the manager noticed
        return Unplaceable(f"swarm node {node[:12]} went down before the worker started")
    return None
