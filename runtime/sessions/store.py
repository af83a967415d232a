"""The embedded session store: SQLite (stdlib ``sqlite3``) in WAL mode, in the state directory.

Why SQLite: it needs no setting and no server, survives a SIGKILL of ``serve`` (a
committed row is on disk), and answers the history and usage queries an operator bills
from. It is also the outage buffer when records go on to Supabase: every change bumps a
row's ``version``, and the shipper (``runtime/sessions/shipper.py``) sends the rows whose
``version`` is past their ``shipped`` one, so a row written while Supabase is down is sent
when it returns, and one sent twice is the same upsert.

One connection writes, one reads, each behind its own lock (WAL lets a reader read while
the writer writes); other processes (``autonomite usage``, the shipper) open their own.
A record arrives in parts (the trigger, its answer, the agent's join, the end): each part
is an upsert that fills what it knows and keeps what was there.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.contract import EndCause
from runtime.sessions.outbox import OUTBOX_INSERT, OUTBOX_SCHEMA, Event, OutboxEvent, outbox_rows

FILE_NAME = "sessions.sqlite"  # in runtime.state_dir

_SCHEMA = """
create table if not exists sessions (
    id             text primary key,
    client         text not null,
    agent          text,
    room           text,
    worker_id      text,
    backend        text,
    livekit_url    text,
    user_hash      text,
    status         integer,
    error          text,
    end_cause      text,
    received_at    real,
    answered_at    real,
    joined_at      real,
    user_joined_at real,
    ended_at       real,
    version        integer not null default 1,
    shipped        integer not null default 0,
    owner          text      -- the serve that wrote it last (runtime/sessions/owners.py)
);
create index if not exists sessions_client_received on sessions (client, received_at);
create index if not exists sessions_received on sessions (received_at);
create index if not exists sessions_unshipped on sessions (id) where version > shipped;
create table if not exists idle_seconds (
    client  text not null,
    minute  integer not null,  -- Unix time // 60: usage sums whole minutes
    seconds real not null,
    primary key (client, minute)
);
"""


@dataclass(frozen=True)
class SessionRecord:
    """What is known of one trigger's session; None: not known (yet). Times are Unix seconds.
    Never a secret, an email in clear or a context value: ``user_hash`` is the caller's
    participant identity, a hash of the email, as the logs have it."""

    id: str
    client: str
    agent: str | None = None
    room: str | None = None
    worker_id: str | None = None
    backend: str | None = None
    livekit_url: str | None = None  # the LiveKit project the worker registered with: its URL only
    user_hash: str | None = None
    status: int | None = None  # the trigger's HTTP answer
    error: str | None = None  # its error code, if refused
    end_cause: EndCause | None = None
    received_at: float | None = None
    answered_at: float | None = None
    joined_at: float | None = None  # the agent joined the room
    user_joined_at: float | None = None  # the first end user did
    ended_at: float | None = None

    @property
    def seconds(self) -> float | None:
        """How long the session lasted: from the agent joining to its end."""
        if self.joined_at is None or self.ended_at is None or self.end_cause == "runtime_restart":
            return None  # a session closed at the next start: how long it went on is not known
        return max(0.0, self.ended_at - self.joined_at)

    def as_json(self) -> dict[str, Any]:
        """As the API and the webhooks show it: times in ISO 8601 (UTC), and the seconds."""
        times = {name: _iso(getattr(self, name)) for name in _TIMES}
        return {**asdict(self), **times, "seconds": self.seconds}


_TIMES = ("received_at", "answered_at", "joined_at", "user_joined_at", "ended_at")


def _iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


COLUMNS = tuple(f.name for f in fields(SessionRecord))
_SELECT = f"select {', '.join(COLUMNS)} from sessions"
# A part fills in what it knows and keeps the rest; the id's client never changes (a part
# that names another client changes nothing of it: ids are random, a clash is a bug).
_UPSERT = (
    f"insert into sessions ({', '.join(COLUMNS)}, owner) values ({', '.join('?' * (len(COLUMNS) + 1))}) "
    "on conflict(id) do update set "
    + ", ".join(f"{c} = coalesce(excluded.{c}, sessions.{c})" for c in COLUMNS if c not in ("id", "client"))
    + ", version = sessions.version + 1, owner = excluded.owner where sessions.client = excluded.client"
)


LOCK_WAIT_S = 10.0  # a write waits this long on another process's lock before it fails


class SqliteStore:
    def __init__(self, path: Path, owner: str = "", lock_wait_s: float = LOCK_WAIT_S) -> None:
        """``lock_wait_s``: how long a write waits on a lock another process holds, before
        it fails (and the session log tries it again later)."""
        self.path, self.owner = path, owner  # owner: this serve's, written on every row it writes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock, self._read_lock = threading.Lock(), threading.Lock()
        self._db = connect(path, lock_wait_s)
        self._db.executescript(_SCHEMA + OUTBOX_SCHEMA)
        _add_missing_columns(self._db)
        self._reader = connect(path)

    # -- writing (the session log's thread) ------------------------------------------------

    def put(self, record: SessionRecord) -> None:
        self.write([record], {})

    def write(self, records: Iterable[SessionRecord], idle: dict[tuple[str, int], float],
              announce: Iterable[tuple[str, Event]] = ()) -> None:
        """Parts of records, idle seconds by (client, minute) and the webhook events to send
        (session id, event), in one transaction: a batch costs one fsync of the WAL, not one
        per part, and an event exists exactly when the record it tells of does. An event's
        body is the record as merged in this very transaction."""
        with self._write_lock:
            if self._db.in_transaction:  # a commit that failed (a full disk) can leave one open
                self._db.execute("rollback")
            self._db.execute("begin")
            try:
                self._db.executemany(_UPSERT, [(*(getattr(r, c) for c in COLUMNS), self.owner) for r in records])
                self._db.executemany(
                    "insert into idle_seconds values (?, ?, ?) "
                    "on conflict(client, minute) do update set seconds = seconds + excluded.seconds",
                    [(client, minute, s) for (client, minute), s in idle.items()],
                )
                events = []
                for session_id, event in announce:
                    row = self._db.execute(f"{_SELECT} where id = ?", (session_id,)).fetchone()
                    if row is not None:
                        r = record(row)
                        events.append(OutboxEvent(r.client, r.id, event, r.as_json()))
                self._db.executemany(OUTBOX_INSERT, outbox_rows(events))
                self._db.execute("commit")
            except BaseException:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):  # the next write rolls back what this could not
                        self._db.execute("rollback")
                raise

    # -- reading (any thread) ----------------------------------------------------------------

    def _read(self, query: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._reader.execute(query, tuple(args)).fetchall()

    def get(self, session_id: str) -> SessionRecord | None:
        rows = self._read(f"{_SELECT} where id = ?", (session_id,))
        return record(rows[0]) if rows else None

    def page(self, client: str | None = None, since: float | None = None, until: float | None = None,
             after: tuple[float, str] | None = None, limit: int = 100) -> list[SessionRecord]:
        """Records in the order they were received; ``after``: the (received_at, id) of the
        last one of the page before (a stable cursor: later records do not shift it)."""
        where, args = ["1 = 1"], []
        for clause, value in (("client = ?", client), ("received_at >= ?", since), ("received_at < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if after is not None:
            where.append("(received_at, id) > (?, ?)")
            args += list(after)
        rows = self._read(f"{_SELECT} where {' and '.join(where)} order by received_at, id limit ?", [*args, limit])
        return [record(r) for r in rows]

    def open_sessions(self, alive: Callable[[str | None], bool] = lambda owner: False) -> list[SessionRecord]:
        """Not ended, answered 200 or not answered at all, and written last by a runtime
        that is gone (``alive`` says which still run): what a start must close, or follow
        on a worker it adopts. A live runtime's (the one a rolling restart replaces) are
        its own to close."""
        rows = self._read(f"select {', '.join(COLUMNS)}, owner from sessions "
                          "where ended_at is null and (status = 200 or status is null)")
        return [record(r[:-1]) for r in rows if not alive(r[-1])]

    def usage(self, client: str | None, since: float, until: float) -> dict[str, dict[str, Any]]:
        """Per client: sessions by end cause, session seconds, idle worker seconds and refused
        triggers, for sessions received in [since, until) and idle minutes in it."""
        who, args = ("client = ? and ", [client]) if client is not None else ("", [])
        rows = self._read(
            "select client, coalesce(end_cause, case when ended_at is not null then 'unknown' when status = 200 "
            "then 'open' when status is null then 'pending' else 'refused' end), count(*), "
            "sum(case when joined_at is not null and ended_at is not null and end_cause is not 'runtime_restart' "
            "then max(0, ended_at - joined_at) "
            f"else 0 end) from sessions where {who}received_at >= ? and received_at < ? group by 1, 2",
            [*args, since, until],
        )
        idle = self._read(f"select client, sum(seconds) from idle_seconds where {who}minute >= ? and minute < ? "
                          "group by 1", [*args, int(since // 60), int(-(-until // 60))])
        out: dict[str, dict[str, Any]] = {}
        for cid, cause, count, seconds in rows:
            u = out.setdefault(cid, empty_usage())
            u["sessions"][cause] = count
            u["session_seconds"] = round(u["session_seconds"] + (seconds or 0.0), 3)
            if cause == "refused":
                u["refused"] = count
        for cid, seconds in idle:
            out.setdefault(cid, empty_usage())["idle_worker_seconds"] = round(seconds or 0.0, 3)
        return out

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._db.close()
            self._reader.close()


# Columns added since the table was first shipped: a file an older runtime wrote gets them
# at start (``create table if not exists`` leaves an existing table as it is).
_ADDED_COLUMNS = (("owner", "text"),)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    have = {row[1] for row in db.execute("pragma table_info(sessions)")}
    for name, declaration in _ADDED_COLUMNS:
        if name not in have:
            db.execute(f"alter table sessions add column {name} {declaration}")


def connect(path: Path, lock_wait_s: float = LOCK_WAIT_S) -> sqlite3.Connection:
    """A connection as every user of the file needs it: WAL, and waiting (not failing) on a
    lock another process holds for a moment (the shipper, ``autonomite usage``)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=lock_wait_s)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=normal")  # WAL: a crash of serve loses nothing committed
    return db


def record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(**dict(zip(COLUMNS, row, strict=True)))


def empty_usage() -> dict[str, Any]:
    return {"sessions": {}, "session_seconds": 0.0, "idle_worker_seconds": 0.0, "refused": 0}
