"""What the session log's writer has yet to write: kept across a failed write, bounded.

Why: a full disk or a lock held too long must not lose billing records, so what a write
could not store waits here for the next try (``runtime/sessions/log.py``). Parts of one
record are merged as they arrive (later parts fill in), so a long outage costs one entry
per record, not one per event, and a retry does not re-merge everything it holds.

Owned by the writer thread; other threads read only :attr:`Pending.count` (a ``len``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.sessions.outbox import Event as WebhookEvent
from runtime.sessions.store import SessionRecord

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
