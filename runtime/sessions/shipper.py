"""Session records to Supabase: every change, exactly one row per record, through outages.

The embedded SQLite store (``store.py``) is the outage buffer. Each change to a row bumps
its ``version``; ``shipped`` is the version last sent. The shipper sends the rows whose
version is past it, oldest received first, as one upsert by id into the project's
``sessions`` table (``config/supabase/schema.sql``), then marks each with the version it
sent, but only if the row still has that version: one that changed meanwhile stays
pending and goes again, and an upsert sent twice is the same row. So nothing is lost
while Supabase is down or across a restart (the marks are in the file), and nothing is
doubled (the id is the key).

Failures: an outage (a refused connection, a timeout, a 5xx, a refused key) keeps every
row and backs off, 1 s doubling to 30 s, and says so once, not at every attempt. A batch
PostgREST refuses as bad data (a 4xx) is sent again row by row, and the rows refused as
data (SQLSTATE class 22 or 23: a check constraint, a bad value) are marked shipped and
counted as rejected, so one bad row never holds up the others. A 4xx that is not about
the data (no such table or column) is handled like an outage: rejecting would discard
every row until someone fixes the schema.

Threads: the shipper's own thread owns its SQLite connection's writes, its Supabase
client and its counters; ``status()`` (any thread) reads the counters under a lock and
counts pending rows on the same connection under another.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.sessions.store import COLUMNS, connect
from runtime.settings import SupabaseSettings
from runtime.supabase_api import CALL_TIMEOUT_S, SupabaseApi, refused

log = logging.getLogger(__name__)

TABLE = "sessions"
BACKOFF_S = (1.0, 30.0)  # first and longest wait after a failed attempt
TIMES = frozenset({"received_at", "answered_at", "joined_at", "user_joined_at", "ended_at"})
_PENDING = f"select {', '.join(COLUMNS)}, version from sessions where version > shipped order by received_at, id limit ?"
_MARK = "update sessions set shipped = ? where id = ? and version = ?"


class RowRejected(Exception):
    """This row is bad data to Supabase (or to its conversion): sending it again cannot help."""


class ShipFailed(Exception):
    """Supabase answered, but not about the rows (a 5xx, a refused key, no such table): retry later."""


@dataclass(frozen=True)
class _Row:
    id: str
    version: int
    values: dict[str, Any]  # as Supabase gets them: times in ISO 8601, UTC


class Shipper:
    """Ships a SQLite session store's file to Supabase on a thread of its own.

    Start it once the file exists (``SqliteStore`` creates it). ``wake()`` after a write
    ships at once instead of at the next ``interval_s``; ``stop()`` leaves what is pending
    in the file for the next shipper.
    """

    def __init__(self, path: Path, settings: SupabaseSettings, *, table: str = TABLE, batch: int = 500,
                 interval_s: float = 2.0, backoff_s: tuple[float, float] = BACKOFF_S) -> None:
        self.path, self.table, self.batch, self.interval_s = path, table, batch, interval_s
        self._backoff_s = backoff_s
        self._api = SupabaseApi(settings.url, settings.service_key.get_secret_value())
        self._key = settings.service_key.get_secret_value()  # only to scrub it from error text
        self._db = connect(path)
        self._db_lock, self._lock = threading.Lock(), threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-shipper", daemon=True)
        # Counters: written by the shipper's thread under _lock, read by status().
        self._shipped_total = self._failures_total = self._rejected_total = 0
        self._last_error: str | None = None
        self._last_shipped_at: float | None = None

    # -- any thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Rows were written: look now, not at the end of the idle wait (a backoff stays)."""
        self._wake.set()

    def stop(self, timeout: float = CALL_TIMEOUT_S + 5) -> bool:
        """Stop and wait at most ``timeout`` (a call in flight ends within its own timeout).
        True if the thread ended; pending rows stay in the file either way."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("session shipper: still in a call after %.0f s; leaving it", timeout)
            return False
        with self._db_lock:
            self._db.close()
        self._api.close()
        return True

    def status(self) -> dict[str, Any]:
        try:
            with self._db_lock:
                pending: int | None = self._db.execute("select count(*) from sessions where version > shipped").fetchone()[0]
        except sqlite3.Error:
            pending = None  # closed, or no table yet
        with self._lock:
            return {"pending": pending, "shipped_total": self._shipped_total, "failures_total": self._failures_total,
                    "rejected_total": self._rejected_total, "last_error": self._last_error,
                    "last_shipped_at": self._last_shipped_at}

    # -- the shipper's thread ----------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0  # the wait after the last failure; 0: the last attempt succeeded
        while not self._stop.is_set():
            self._wake.clear()  # before reading: a write after the read wakes the next wait
            try:
                sent = self._ship_batch()
            except Exception as e:  # noqa: BLE001 - an outage or a bad answer: keep the rows, wait, go on
                self._failed(e, first=not delay)
                delay = min(self._backoff_s[1], max(self._backoff_s[0], delay * 2))
                self._stop.wait(delay)
                continue
            if delay:
                log.info("session shipper: Supabase reachable again; shipping the records kept meanwhile")
                delay = 0.0
            if not sent:
                self._wake.wait(self.interval_s)

    def _ship_batch(self) -> int:
        """Send one batch of pending rows; return how many went (sent or rejected)."""
        with self._db_lock:
            rows = self._db.execute(_PENDING, (self.batch,)).fetchall()
        if not rows:
            return 0
        ready: list[_Row] = []
        rejected: list[tuple[_Row, str]] = []
        for *values, version in rows:
            try:
                ready.append(_Row(values[0], version, supabase_row(dict(zip(COLUMNS, values, strict=True)))))
            except RowRejected as e:  # a time no timestamp holds: Supabase would refuse it too
                rejected.append((_Row(values[0], version, {}), str(e)))
        sent: list[_Row] = []
        try:
            if ready:
                try:
                    self._upsert(ready)
                    sent = ready
                except RowRejected:  # somewhere in the batch: find which, one at a time
                    for row in ready:
                        try:
                            self._upsert([row])
                            sent.append(row)
                        except RowRejected as e:
                            rejected.append((row, str(e)))
        finally:  # what went before a failure is marked: it need not go again
            self._mark(sent, rejected)
        return len(sent) + len(rejected)

    def _upsert(self, rows: list[_Row]) -> None:
        from postgrest import APIError
        from postgrest.types import ReturnMethod

        try:
            self._api.table(self.table).upsert([r.values for r in rows], on_conflict="id", returning=ReturnMethod.minimal,
                                               default_to_null=False).execute()
        except APIError as e:
            status, code = self._api.status, str(e.code or "")
            said = ", ".join(part for part in (code, str(e.message or "")[:160]) if part)
            reason = self._scrub(f"HTTP {status}: {said}" if said else f"HTTP {status}")
            if about_the_rows(status, code, len(rows)):
                raise RowRejected(reason) from None
            raise ShipFailed(reason) from None

    def _mark(self, sent: list[_Row], rejected: list[tuple[_Row, str]]) -> None:
        for row, reason in rejected:
            log.warning("session shipper: Supabase rejected session %s (%s); it stays only in SQLite", row.id, reason)
        done = sent + [row for row, _ in rejected]
        if done:
            with self._db_lock:
                self._db.execute("begin immediate")
                try:
                    self._db.executemany(_MARK, [(r.version, r.id, r.version) for r in done])
                except BaseException:
                    self._db.execute("rollback")
                    raise
                self._db.execute("commit")
        with self._lock:
            self._shipped_total += len(sent)
            self._rejected_total += len(rejected)
            if sent:
                self._last_shipped_at = time.time()

    def _failed(self, e: Exception, first: bool) -> None:
        """Count and keep the failure; log only the first of a run of them (one line per outage)."""
        reason = self._scrub(str(e) if isinstance(e, ShipFailed) else f"{type(e).__name__}: {str(e)[:200]}")
        with self._lock:
            self._failures_total += 1
            self._last_error = reason
        if first:
            log.warning("session shipper: cannot ship (%s); records stay in SQLite, retrying every %g to %g s",
                        reason, *self._backoff_s)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "<service key>") if self._key else text


def about_the_rows(status: int | None, code: str, rows: int) -> bool:
    """Whether a refusal of an upsert of ``rows`` rows may be the rows' fault. Of a batch:
    any 4xx but a refused key (try the rows one at a time to find out). Of one row: only a
    4xx PostgreSQL raised about the data, SQLSTATE class 22 (a bad value) or 23 (a broken
    constraint); anything else (no such table or column) would refuse every row alike."""
    if status is None or not 400 <= status < 500 or refused(status, code):
        return False
    return rows > 1 or code[:2] in ("22", "23")


def supabase_row(values: dict[str, Any]) -> dict[str, Any]:
    """A SQLite row as the ``sessions`` table takes it: Unix seconds become ISO 8601 in UTC,
    None stays null. Raise RowRejected for a time no timestamp can hold."""
    out = dict(values)
    for name in TIMES:
        t = out[name]
        if t is not None:
            try:
                out[name] = datetime.fromtimestamp(t, UTC).isoformat()
            except (ValueError, OverflowError, OSError, TypeError):
                raise RowRejected(f"{name} is not a time: {t!r}") from None
    return out
