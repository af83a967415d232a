"""The session log: every trigger's record, written off the trigger's path.

The dispatcher, the gateway and the pools tell it what happens (a trigger came, went to a
worker, was answered; the worker's agent joined, a user came, the session ended; a worker
sat idle) with calls that only put a small event on a queue: nothing that serves a trigger
ever waits on the store. One writer thread owns everything else: it takes the events in
batches, keeps the index of open sessions (which session each leased worker serves), and
writes each batch in one transaction (``runtime/sessions/store.py``).

Times are stamped where the event happens, in Unix seconds, by the runtime: a worker is
untrusted, so what it reports is *that* its agent joined or its session ended, and the
runtime notes *when* it heard.

A restart: the sessions left open are loaded at start. Those on a worker the new runtime
adopted are closed by that worker's own report; the others by :meth:`SessionLog.close_orphans`,
as ``runtime_restart``.

Each batch also makes the webhook events of the clients that have a webhook
(``session.started`` when a session is answered 200, ``session.ended`` at its end), written
in the same transaction as the records (``runtime/sessions/outbox.py``), and sent by the
deliverer (``runtime/sessions/webhooks.py``) on its own threads.

State owned by the writer thread: ``_by_worker``, ``_open``, ``_answered``, and what is
yet to be written (``_writes``, ``runtime/sessions/writes.py``: kept across a write the
store refused, and tried again). The queue is the only shared part.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.contract import EndCause, Milestones
from runtime.metrics import Metrics
from runtime.sessions.outbox import Event as WebhookEvent
from runtime.sessions.store import SessionRecord, SqliteStore
from runtime.sessions.writes import Writes

logger = logging.getLogger("autonomite.sessions")

MAX_QUEUED = 100_000  # events waiting for the writer; past it they are dropped and counted
BATCH = 1_000
BATCH_WAIT_S = 0.05  # the writer gathers events this long after the first of a batch


@dataclass(frozen=True)
class _Received:
    session_id: str
    client: str
    agent: str
    room: str
    user_hash: str | None
    at: float


@dataclass(frozen=True)
class _Leased:
    session_id: str
    client: str
    worker_id: str
    livekit_url: str


@dataclass(frozen=True)
class _Released:
    session_id: str
    client: str
    worker_id: str


@dataclass(frozen=True)
class _Answered:
    session_id: str
    client: str
    status: int
    error: str | None
    at: float


@dataclass(frozen=True)
class _Progress:
    client: str
    worker_id: str
    seen: Milestones
    at: float


@dataclass(frozen=True)
class _WorkerGone:
    client: str
    worker_id: str
    failed: bool
    at: float


@dataclass(frozen=True)
class _Idle:
    client: str
    seconds: float
    at: float


@dataclass(frozen=True)
class _Orphans:
    live: frozenset[tuple[str, str]]  # (client, worker id) of every worker still running
    at: float


@dataclass(frozen=True)
class _Flush:
    done: threading.Event


Event = _Received | _Leased | _Released | _Answered | _Progress | _WorkerGone | _Idle | _Orphans | _Flush


@dataclass
class _Open:
    """A session not over yet, as the writer knows it."""

    client: str
    worker_id: str | None = None
    joined_at: float | None = None
    user_joined: bool = False


class SessionLog:
    def __init__(self, store: SqliteStore, backend: str, metrics: Metrics | None = None,
                 on_written: Callable[[], None] = lambda: None,
                 has_webhook: Callable[[str], bool] = lambda client: False,
                 alive: Callable[[str | None], bool] = lambda owner: False) -> None:
        """``alive(owner)``: whether the runtime that last wrote a session still runs (a
        rolling restart's old one): only a gone runtime's open sessions are taken over."""
        self.store, self.backend, self.metrics = store, backend, metrics
        # Whether a client wants session events now (read at the event: a client that
        # configures a webhook mid-session gets that session's end, not its start).
        self.has_webhook = has_webhook
        # SimpleQueue: a put is one C call with no condition variable, and triggers put two
        # each; the bound is kept by hand (qsize), loosely, which is all it needs to be.
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="session-log", daemon=True)
        self._stopping = False
        self._open: dict[str, _Open] = {}
        self._by_worker: dict[tuple[str, str], str] = {}
        self._answered: set[str] = set()  # answered 200, not ended yet: their end is an event
        self._writes = Writes(store, on_written)  # what the next write carries, and when it is tried
        for r in store.open_sessions(alive):  # left open by a runtime that died
            self._open[r.id] = _Open(r.client, r.worker_id, r.joined_at, r.user_joined_at is not None)
            if r.status == 200:
                self._answered.add(r.id)
            if r.worker_id is not None:
                self._by_worker[(r.client, r.worker_id)] = r.id
        self.dropped = 0  # events dropped by the callers (a queue past MAX_QUEUED)

    def start(self) -> SessionLog:
        self._thread.start()
        return self

    # -- what happens (any thread; never blocks) -----------------------------------------

    def received(self, session_id: str, client: str, agent: str, room: str, user_hash: str | None,
                 at: float) -> None:
        self._put(_Received(session_id, client, agent, room, user_hash, at))  # the record is made on the writer's thread

    def refused(self, session_id: str, client: str, agent: str, room: str, user_hash: str | None, at: float,
                status: int, error: str) -> None:
        """A trigger refused before it reached the dispatcher (the gateway's refusals)."""
        self.received(session_id, client, agent, room, user_hash, at)
        self.answered(session_id, client, status, error)

    def leased(self, session_id: str, client: str, worker_id: str, livekit_url: str) -> None:
        """The trigger goes to this worker (a retry after a failed handoff: to another)."""
        self._put(_Leased(session_id, client, worker_id, livekit_url))

    def released(self, session_id: str, client: str, worker_id: str) -> None:
        """The handoff to this worker failed and the trigger is tried elsewhere: what the
        worker does from now on (its exit) is no longer this session's."""
        self._put(_Released(session_id, client, worker_id))

    def answered(self, session_id: str, client: str, status: int, error: str | None = None) -> None:
        self._put(_Answered(session_id, client, status, error, time.time()))

    def progress(self, client: str, worker_id: str, seen: Milestones) -> None:
        self._put(_Progress(client, worker_id, seen, time.time()))

    def worker_gone(self, client: str, worker_id: str, failed: bool) -> None:
        """A leased worker exited: its session ends here if it did not say so itself."""
        self._put(_WorkerGone(client, worker_id, failed, time.time()))

    def idle(self, client: str, seconds: float) -> None:
        self._put(_Idle(client, seconds, time.time()))

    def close_orphans(self, live: set[tuple[str, str]]) -> None:
        """After a start: sessions left open on a worker that is not running are over."""
        self._put(_Orphans(frozenset(live), time.time()))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was told before has been applied and a write tried (tests, and a
        stop): while the store fails, what it refused is still pending (:attr:`unwritten`)."""
        done = threading.Event()
        self._put(_Flush(done))
        return done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self.flush(timeout)
            self._stopping = True
            self._put(_Flush(threading.Event()))
            self._thread.join(timeout)
        self._writes.give_up()

    @property
    def unwritten(self) -> int:
        """Records waiting for the store after a failed write (any thread may ask)."""
        return self._writes.unwritten

    @property
    def lost(self) -> int:
        """Records the writer lost: a store down too long, a bug's batch, a stop."""
        return self._writes.lost

    def _put(self, event: Event) -> None:
        if self._queue.qsize() < MAX_QUEUED:
            self._queue.put(event)
        else:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                logger.error("session log: %d events dropped, the store is not keeping up", self.dropped)

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            # With a failed write pending, wake up to try it again even if nothing comes.
            wait = self._writes.wait()
            try:
                batch = [self._queue.get(timeout=wait)]
            except queue.Empty:
                batch = []
            # Gather for a moment: a storm of triggers then costs a transaction every
            # BATCH_WAIT_S, not one per event (and a thread switch per event). A record
            # lands that much later, which nobody waits on; a flush does not wait.
            deadline = time.monotonic() + BATCH_WAIT_S
            while batch and len(batch) < BATCH and not isinstance(batch[-1], _Flush):
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # a bug: logged, and the writer goes on (it never dies of a record)
                logger.exception("session log: writing a batch failed")
                self._writes.later()  # not at once, in a loop
            for event in batch:
                if isinstance(event, _Flush):
                    event.done.set()

    def _write(self, batch: list[Event]) -> None:
        for event in batch:
            try:
                self._writes.pending.add(self._apply(event))
            except Exception:  # a bad event (a bug) is logged and skipped: never the batch around it
                logger.exception("session log: skipping an event it cannot apply: %s", type(event).__name__)
        # A flush tries at once, even while the store is failing: a stop's is the last chance.
        self._writes.write(now=bool(batch) and isinstance(batch[-1], _Flush))

    def _tell(self, sid: str, client: str, event: WebhookEvent) -> None:
        """A webhook event, if the client has a webhook now (a refusal makes none)."""
        if self.has_webhook(client):
            self._writes.pending.announce.append((sid, event))

    def _apply(self, event: Event) -> list[SessionRecord]:
        match event:
            case _Received(sid, client, agent, room, user, at):
                self._open[sid] = _Open(client)
                return [SessionRecord(sid, client, agent=agent, room=room, backend=self.backend, user_hash=user,
                                      received_at=at)]
            case _Leased(sid, client, worker_id, url):
                session = self._open.get(sid)
                if session is None:
                    return []
                if session.worker_id is not None:
                    self._unmap(client, session.worker_id, sid)
                session.worker_id = worker_id
                self._by_worker[(client, worker_id)] = sid
                return [SessionRecord(sid, client, worker_id=worker_id, livekit_url=url)]
            case _Released(sid, client, worker_id):
                self._unmap(client, worker_id, sid)
                return []
            case _Answered(sid, client, status, error, at):
                part = SessionRecord(sid, client, status=status, error=error, answered_at=at)
                if status != 200:  # refused: no session follows
                    self._end(sid)
                elif sid in self._open:
                    self._answered.add(sid)
                    self._tell(sid, client, "session.started")
                else:  # its end came first (a very short session): both events, in order
                    self._tell(sid, client, "session.started")
                    self._tell(sid, client, "session.ended")
                return [part]
            case _Progress(client, worker_id, seen, at):
                return self._progress(client, worker_id, seen, at)
            case _WorkerGone(client, worker_id, failed, at):
                served = self._by_worker.get((client, worker_id))
                return [self._ended(served, "worker_failed" if failed else None, at)] if served else []
            case _Idle(client, seconds, at):
                self._writes.pending.add_idle(client, int(at // 60), seconds)
                return []
            case _Orphans(live, at):
                gone = [sid for sid, s in self._open.items()
                        if s.worker_id is None or (s.client, s.worker_id) not in live]
                if gone:
                    logger.info("closing %d sessions the last runtime left open (their workers are gone)", len(gone))
                return [self._ended(sid, "runtime_restart", at) for sid in gone]
        return []

    def _progress(self, client: str, worker_id: str, seen: Milestones, at: float) -> list[SessionRecord]:
        sid = self._by_worker.get((client, worker_id))
        session = self._open.get(sid) if sid else None
        if sid is None or session is None:
            return []
        parts = []
        if seen.in_room and session.joined_at is None:
            session.joined_at = at
            parts.append(SessionRecord(sid, client, joined_at=at))
        if seen.user_joined and not session.user_joined:
            session.user_joined = True
            parts.append(SessionRecord(sid, client, user_joined_at=at))
        if seen.end_cause is not None:
            parts.append(self._ended(sid, seen.end_cause, at))
        return parts

    def _ended(self, sid: str, cause: EndCause | None, at: float) -> SessionRecord:
        """``cause`` None: the worker exited cleanly without saying why (its last status was
        missed); the record then says the session ended, not how."""
        session = self._end(sid)
        client = session.client if session else ""
        # A session closed at a restart went on for a time nobody knows: not counted.
        if session is not None and session.joined_at is not None and self.metrics is not None \
                and cause != "runtime_restart":
            self.metrics.session_seconds.labels(client).inc(max(0.0, at - session.joined_at))
        if sid in self._answered:
            self._answered.discard(sid)
            self._tell(sid, client, "session.ended")
        return SessionRecord(sid, client, end_cause=cause, ended_at=at)

    def _unmap(self, client: str, worker_id: str, sid: str) -> None:
        """The worker serves this session no more (only if it still did: not another's)."""
        if self._by_worker.get((client, worker_id)) == sid:
            del self._by_worker[(client, worker_id)]

    def _end(self, sid: str) -> _Open | None:
        session = self._open.pop(sid, None)
        if session is not None and session.worker_id is not None:
            self._unmap(session.client, session.worker_id, sid)
        return session

    def open_count(self) -> int:
        """Sessions not over (read from any thread: a dict's len is atomic)."""
        return len(self._open)



def user_hash(email: str | None) -> str | None:
    """The caller as the logs and LiveKit see them: a hash of the email, never the email."""
    return "user-" + hashlib.sha256(email.lower().encode()).hexdigest()[:12] if email else None
