"""The session log's writes: what is yet to be written, and how it gets to the store.

Why: a full disk or a lock held too long must not lose billing records, so what a write
could not store waits here and is tried again (``runtime/sessions/log.py`` feeds it).
Parts of one record are merged as they arrive (later parts fill in), so a long outage
costs one entry per record, not one per event, and a retry does not re-merge everything.
A batch that fails for its own sake (a bug's value) is not an outage: retrying it would
hold up every record after it, so its records are written one by one instead.

Owned by the session log's writer thread; other threads read only the counters.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import describe
from runtime.sessions.outbox import Event as WebhookEvent
from runtime.sessions.store import SessionRecord, SqliteStore

logger = logging.getLogger("autonomite.sessions")

RETRY_S = 1.0  # a write the store failed (a full disk, a lock held too long) is tried again

MAX_KEPT = 100_000  # records (and idle minutes) kept for a retry; past it the oldest go


@dataclass
class Pending:
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> known fields, in arrival order
    idle: dict[tuple[str, int], float] = field(default_factory=dict)  # (client, minute) -> seconds
    announce: list[tuple[str, WebhookEvent]] = field(default_factory=list)  # (session id, event), in order

    def add(self, parts: list[SessionRecord]) -> None:
        for part in parts:
            self.records.setdefault(part.id, {}).update((k, v) for k, v in vars(part).items() if v is not None)

    def add_idle(self, client: str, minute: int, seconds: float) -> None:
        self.idle[(client, minute)] = self.idle.get((client, minute), 0.0) + seconds

    @property
    def count(self) -> int:
        return len(self.records)

    def __bool__(self) -> bool:
        return bool(self.records or self.idle)

    def parts(self) -> list[SessionRecord]:
        """One part per record: what is known of each (a short session's six events, or a
        refusal's two, become one row write)."""
        return [SessionRecord(**fields) for fields in self.records.values()]

    def bound(self, limit: int = MAX_KEPT) -> int:
        """Drop the oldest records past ``limit``, with their webhook events (an event is
        sent with its record, so it cannot outlive it), and the oldest idle minutes past
        it; return how many records went."""
        lost = max(0, len(self.records) - limit)
        for sid in list(self.records)[:lost]:
            del self.records[sid]
        if lost:
            self.announce = [(sid, event) for sid, event in self.announce if sid in self.records]
        for key in list(self.idle)[:max(0, len(self.idle) - limit)]:
            del self.idle[key]
        return lost


class Writes:
    def __init__(self, store: SqliteStore, on_written: Callable[[], None]) -> None:
        self.store = store
        self.on_written = on_written  # after each write (the shipper and the webhook deliverer look)
        self.pending = Pending()  # what the next write carries: new, and what a failed write left
        self.next_try = 0.0  # after a failed write: no write before this (monotonic); 0: not failing
        self.lost = 0  # records lost: a store down too long, a bug's value, a stop

    @property
    def unwritten(self) -> int:
        """Records waiting for the store after a failed write."""
        return self.pending.count if self.next_try else 0

    def wait(self) -> float | None:
        """How long the writer may sleep with nothing told: until the next try, or for ever."""
        return max(0.0, self.next_try - time.monotonic()) if self.pending else None

    def later(self) -> None:
        self.next_try = time.monotonic() + RETRY_S

    def write(self, now: bool = False) -> None:
        """Write what is pending in one transaction, if a try is due (or ``now``). When the
        store fails (SQLite's OperationalError: a lock held too long, a full disk) it is kept
        and tried again after RETRY_S, with what came meanwhile."""
        if not self.pending or not (now or time.monotonic() >= self.next_try):
            return
        failing, pending = self.next_try > 0, self.pending
        try:
            self.store.write(pending.parts(), pending.idle, pending.announce)
        except sqlite3.OperationalError as e:
            if not failing:
                logger.error("session log: cannot write %d records (%s); keeping them and trying again every %g s",
                             pending.count, describe(e), RETRY_S)
            if lost := pending.bound():
                self.lost += lost
                logger.error("session log: %d records dropped, the store has failed too long", lost)
            self.later()
            return
        except Exception:
            logger.exception("session log: a batch of %d records could not be written; writing them one by one",
                             pending.count)
            self.pending, self.next_try = Pending(), 0.0
            self._one_by_one(pending)
            return
        if failing:
            logger.info("session log: the store writes again; %d kept records are written", pending.count)
        self.pending, self.next_try = Pending(), 0.0
        self.on_written()

    def give_up(self) -> None:
        """A stop: what the store would still not take is lost, and said so."""
        if self.pending:
            logger.error("session log: stopping with %d records (and %d idle minutes) the store would not take; "
                         "they are lost", self.pending.count, len(self.pending.idle))
            self.lost += self.pending.count
            self.pending = Pending()

    def _one_by_one(self, pending: Pending) -> None:
        events: dict[str, list[tuple[str, WebhookEvent]]] = {}
        for sid, event in pending.announce:
            events.setdefault(sid, []).append((sid, event))
        bad = 0
        for part in pending.parts():
            try:
                self.store.write([part], {}, events.get(part.id, []))
            except Exception:  # noqa: BLE001 (counted and logged below)
                bad += 1
        try:
            self.store.write([], pending.idle)
        except Exception:
            logger.exception("session log: %d idle minutes could not be written", len(pending.idle))
        self.lost += bad
        logger.error("session log: %d of %d records could not be written and are lost", bad, pending.count)
        self.on_written()
