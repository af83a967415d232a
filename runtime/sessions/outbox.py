"""The webhook outbox: session events waiting to be sent to their client, in the sessions file.

Why an outbox: the producer inserts an event's row in the same transaction as the session
record it tells of, so an event exists exactly when its record does (a crash between
"write the record" and "send the event" loses nothing), and the deliverer
(``runtime/sessions/webhooks.py``) sends what the table holds, across restarts. Each row
carries its idempotency key (``unique``): a replayed event is ignored on insert, and the
receiver sees the same key if a delivery is retried.

The body is built here, once, and sent byte for byte on every attempt (the signature covers
it; the timestamp lives in the header)::

    {"id": "<session_id>:<event>",    # the idempotency key, also the Idempotency-Key header
     "type": "session.started" | "session.ended",
     "created_at": <Unix seconds>,    # when the event was recorded, not sent
     "client": "<client id>",
     "session_id": "<session id>",
     "data": {...}}                   # what the producer gave: never a secret

The functions below the insert are the deliverer's; each takes a connection from
``runtime.sessions.store.connect`` and runs one statement (autocommit).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Event = Literal["session.started", "session.ended"]

OUTBOX_SCHEMA = """
create table if not exists webhook_outbox (
    seq        integer primary key autoincrement,
    client     text not null,
    session_id text not null,
    event      text not null,     -- session.started | session.ended
    body       text not null,     -- the JSON body exactly as sent
    key        text not null unique,  -- the idempotency key: <session_id>:<event>
    attempts   integer not null default 0,
    next_at    real not null,     -- Unix seconds: not sent before
    created_at real not null,
    state      text not null default 'pending',  -- pending | delivered | failed
    last_error text,
    done_at    real               -- delivered or failed at
);
create index if not exists webhook_outbox_pending on webhook_outbox (client, seq) where state = 'pending';
create index if not exists webhook_outbox_session on webhook_outbox (session_id, seq) where state = 'pending';
create index if not exists webhook_outbox_done on webhook_outbox (done_at) where state != 'pending';
"""

OUTBOX_INSERT = (
    "insert or ignore into webhook_outbox (client, session_id, event, body, key, attempts, next_at, created_at, state) "
    "values (?, ?, ?, ?, ?, 0, ?, ?, 'pending')"
)

COLUMNS = "seq, client, session_id, event, body, key, attempts, created_at"


@dataclass(frozen=True)
class OutboxEvent:
    """One event for one client's webhook. ``body``: the event's data (the ``data`` member)."""

    client: str
    session_id: str
    event: Event
    body: dict[str, Any]


@dataclass(frozen=True)
class Row:
    """A pending row as the deliverer reads it."""

    seq: int
    client: str
    session_id: str
    event: str
    body: str
    key: str
    attempts: int
    created_at: float


def key_of(session_id: str, event: str) -> str:
    return f"{session_id}:{event}"


def outbox_rows(events: Iterable[OutboxEvent], now: float | None = None) -> list[tuple[Any, ...]]:
    """Parameters for ``db.executemany(OUTBOX_INSERT, ...)``, in the producer's transaction."""
    now = time.time() if now is None else now
    rows = []
    for e in events:
        key = key_of(e.session_id, e.event)
        body = {"id": key, "type": e.event, "created_at": round(now, 3), "client": e.client,
                "session_id": e.session_id, "data": e.body}
        rows.append((e.client, e.session_id, e.event, json.dumps(body, separators=(",", ":")), key, now, now))
    return rows


# -- the deliverer's statements ----------------------------------------------------------------

# Due: pending, its time come, and no earlier pending event of its session (in order per session).
_DUE = (
    "from webhook_outbox o where o.state = 'pending' and o.next_at <= ? and not exists ("
    "select 1 from webhook_outbox e where e.session_id = o.session_id and e.client = o.client "
    "and e.state = 'pending' and e.seq < o.seq)"
)


def due(db: sqlite3.Connection, now: float, busy: set[str]) -> list[Row]:
    """The first due row of each client not in ``busy`` (one request in flight per client)."""
    firsts = db.execute(f"select o.client, min(o.seq) {_DUE} group by o.client", (now,)).fetchall()
    seqs = [seq for client, seq in firsts if client not in busy]
    if not seqs:
        return []
    rows = db.execute(f"select {COLUMNS} from webhook_outbox where seq in ({', '.join('?' * len(seqs))}) order by seq",
                      seqs).fetchall()
    return [Row(*r) for r in rows]


def next_due(db: sqlite3.Connection, now: float) -> float | None:
    """When the next row not yet due becomes due (a row due now waits on its client's request)."""
    (at,) = db.execute(f"select min(o.next_at) {_DUE.replace('o.next_at <= ?', 'o.next_at > ?')}", (now,)).fetchone()
    return float(at) if at is not None else None


def delivered(db: sqlite3.Connection, seq: int, now: float) -> None:
    db.execute("update webhook_outbox set state = 'delivered', attempts = attempts + 1, last_error = null, done_at = ? "
               "where seq = ?", (now, seq))


def retry(db: sqlite3.Connection, seq: int, error: str, next_at: float) -> bool:
    """False: the row is no longer pending (failed meanwhile: queue full)."""
    cur = db.execute("update webhook_outbox set attempts = attempts + 1, last_error = ?, next_at = ? "
                     "where seq = ? and state = 'pending'", (error, next_at, seq))
    return cur.rowcount > 0


def failed(db: sqlite3.Connection, seq: int, error: str, now: float, attempted: bool) -> bool:
    cur = db.execute("update webhook_outbox set state = 'failed', attempts = attempts + ?, last_error = ?, done_at = ? "
                     "where seq = ? and state = 'pending'", (int(attempted), error, now, seq))
    return cur.rowcount > 0


def overflow(db: sqlite3.Connection, limit: int, now: float, spare: set[int]) -> dict[str, int]:
    """Fail the oldest pending rows of each client past ``limit`` ("queue full"), but those in
    ``spare`` (in flight); how many per client."""
    out: dict[str, int] = {}
    over = db.execute("select client, count(*) - ? from webhook_outbox where state = 'pending' group by client "
                      "having count(*) > ?", (limit, limit)).fetchall()
    for client, excess in over:
        seqs = [seq for (seq,) in db.execute(
            "select seq from webhook_outbox where client = ? and state = 'pending' order by seq limit ?",
            (client, excess + len(spare))) if seq not in spare][:excess]
        db.executemany("update webhook_outbox set state = 'failed', last_error = 'queue full', done_at = ? "
                       "where seq = ? and state = 'pending'", [(now, seq) for seq in seqs])
        out[client] = len(seqs)
    return out


def prune(db: sqlite3.Connection, delivered_before: float, failed_before: float) -> None:
    db.execute("delete from webhook_outbox where (state = 'delivered' and done_at < ?) or (state = 'failed' and done_at < ?)",
               (delivered_before, failed_before))


def pending(db: sqlite3.Connection, client: str) -> int:
    (n,) = db.execute("select count(*) from webhook_outbox where client = ? and state = 'pending'", (client,)).fetchone()
    return int(n)
