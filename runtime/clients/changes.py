"""What the client source reads from Supabase on each poll: changes, not the table.

A poll that re-read every row cost a SaaS with thousands of clients thousands of rows every
ten seconds to find, most of the time, nothing. The table's ``updated_at`` (set by a
trigger, config/supabase/schema.sql) says what changed, so a poll reads:

- the rows updated after the newest ``updated_at`` it has seen (the watermark). A write
  whose transaction commits late carries an older ``updated_at`` than rows read meanwhile
  (``now()`` is when its transaction began), so the first read after the watermark moves
  reaches back ``OVERLAP_S``; later ones do not, or a bulk write would be read again and again;
- the rows a NOTIFY named (with ``database_url``: the payload is the row's id), and the
  rows currently bad (a change elsewhere may free the token one shares);
- every ``RESYNC_EVERY`` polls, each row's id and ``updated_at`` alone: what was deleted,
  and anything the watermark missed (a transaction slower than a poll), is found there and
  read. ``forget`` makes the next read a whole one (an operator's reload).

A table without ``updated_at`` (an older schema) is read whole on every poll, as before.
Pure bookkeeping, no I/O and no clock of its own: unit-tested in tests/unit/test_client_source.py.
Owned by the source watcher's polling lock; ``named`` may be called from the LISTEN thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

OVERLAP_S = 2.0
RESYNC_EVERY = 6  # polls: with the default 10 s interval, deletions are found within a minute


@dataclass
class Plan:
    """One poll's reads. ``since`` None: read every row; ``by_id``: the rows NOTIFY named;
    ``resync``: compare every row's ``updated_at`` too."""

    since: str | None
    by_id: frozenset[str]
    resync: bool


@dataclass
class Changes:
    versions: dict[str, str] = field(default_factory=dict)  # row id -> updated_at, as last read
    watermark: datetime | None = None  # None: read everything next time
    reach_back: bool = False  # the last read moved the watermark: the next looks back OVERLAP_S
    polls: int = 0
    _named: set[str] = field(default_factory=set)
    _named_lock: threading.Lock = field(default_factory=threading.Lock)

    def named(self, row_id: str) -> None:
        """A NOTIFY said this row changed (or went)."""
        with self._named_lock:
            self._named.add(row_id)

    def plan(self) -> Plan:
        self.polls += 1
        with self._named_lock:
            named, self._named = self._named, set()
        if self.watermark is None:
            return Plan(None, frozenset(), resync=False)
        since = self.watermark - timedelta(seconds=OVERLAP_S) if self.reach_back else self.watermark
        return Plan(since.isoformat(), frozenset(named), resync=self.polls % RESYNC_EVERY == 0)

    def forget(self) -> None:
        """Read the whole table next time."""
        self.watermark = None

    def stale(self, versions: dict[str, str]) -> tuple[set[str], set[str]]:
        """From a resync: the rows to read again (new, or changed behind the watermark's
        back), and the rows gone from the table."""
        changed = {row_id for row_id, stamp in versions.items() if self.versions.get(row_id) != stamp}
        return changed, set(self.versions) - set(versions)

    def took(self, rows: list[dict[str, Any]], gone: Iterable[str], whole: bool, by_id: Iterable[str] = ()) -> None:
        """What a poll read and the runtime took: ``whole`` if it was every row of the table.
        Rows read by id (``by_id``) are known from now on, but do not move the watermark: a
        row read out of turn says nothing of the rows written before it."""
        if whole:
            self.versions = {}
        for row_id in gone:
            self.versions.pop(row_id, None)
        out_of_turn = set(by_id)
        newest = None if whole else self.watermark
        for row in rows:
            stamp = row.get("updated_at")
            if not isinstance(stamp, str):
                self.watermark = None  # no updated_at column: every poll reads the whole table
                return
            self.versions[str(row.get("id"))] = stamp
            when = datetime.fromisoformat(stamp)
            if str(row.get("id")) not in out_of_turn and (newest is None or when > newest):
                newest = when
        # Reach back on the next read only if this one moved the watermark. A poll that
        # crashed before it took its rows never gets here: the next one reads them again.
        self.reach_back = newest != self.watermark
        self.watermark = newest
