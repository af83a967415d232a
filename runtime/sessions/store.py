"""The embedded session store: SQLite (stdlib ``sqlite3``) in WAL mode, in the state directory.

Why SQLite: it needs no setting and no server, survives a SIGKILL of ``serve`` (a
committed row is on disk), and answers the history and usage queries an operator bills
from. One writer thread owns the connection; readers open their own (WAL lets them read
while it writes). A record arrives in parts (the trigger, its answer, the agent's join,
the end): each part is an upsert that fills what it knows and keeps what was there.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

EndCause = Literal["user_left", "room_finished", "no_show", "room_deleted", "worker_failed", "drained",
                   "runtime_restart"]

_SCHEMA = """
create table if not exists sessions (
    id             text primary key,
    client         text not null,
    agent          text,
    room           text,
    worker_id      text,
    backend        text,
    livekit_url    text,
    email_hash     text,
    status         integer,
    error          text,
    end_cause      text,
    received_at    real,
    answered_at    real,
    joined_at      real,
    user_joined_at real,
    ended_at       real
);
create index if not exists sessions_client_received on sessions (client, received_at);
"""


@dataclass(frozen=True)
class SessionRecord:
    """What is known of one trigger's session; None: not known (yet). Times are Unix seconds.
    Never a secret, an email in clear or a context value: the email as the logs hash it."""

    id: str
    client: str
    agent: str | None = None
    room: str | None = None
    worker_id: str | None = None
    backend: str | None = None
    livekit_url: str | None = None
    email_hash: str | None = None
    status: int | None = None  # the trigger's HTTP answer
    error: str | None = None  # its error code, if refused
    end_cause: EndCause | None = None
    received_at: float | None = None
    answered_at: float | None = None
    joined_at: float | None = None
    user_joined_at: float | None = None
    ended_at: float | None = None

    @property
    def seconds(self) -> float | None:
        """How long the session lasted: from the agent joining to its end."""
        if self.joined_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.joined_at)


_COLUMNS = [f.name for f in fields(SessionRecord)]


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one writer connection, used from any thread in turn
        self._db = self._connect()
        self._db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("pragma journal_mode=wal")
        db.execute("pragma synchronous=normal")  # WAL: a crash of serve loses nothing committed
        return db

    def put(self, record: SessionRecord) -> None:
        """Insert, or fill in what this part of the record knows (None keeps what is there)."""
        values = asdict(record)
        updates = ", ".join(f"{c} = coalesce(excluded.{c}, sessions.{c})" for c in _COLUMNS if c != "id")
        with self._lock:
            self._db.execute(
                f"insert into sessions ({', '.join(_COLUMNS)}) values ({', '.join('?' * len(_COLUMNS))}) "
                f"on conflict(id) do update set {updates}",
                [values[c] for c in _COLUMNS],
            )

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            row = self._db.execute(f"select {', '.join(_COLUMNS)} from sessions where id = ?",
                                   (session_id,)).fetchone()
        return _record(row) if row else None

    def page(self, client: str | None = None, since: float | None = None, until: float | None = None,
             after: tuple[float, str] | None = None, limit: int = 100) -> list[SessionRecord]:
        """Records in the order they were received; ``after``: the (received_at, id) of the
        last one of the page before (a stable cursor)."""
        where, args = ["1 = 1"], []
        for clause, value in (("client = ?", client), ("received_at >= ?", since), ("received_at < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if after is not None:
            where.append("(received_at, id) > (?, ?)")
            args += list(after)
        query = (f"select {', '.join(_COLUMNS)} from sessions where {' and '.join(where)} "
                 "order by received_at, id limit ?")
        with self._lock:
            rows = self._db.execute(query, [*args, limit]).fetchall()
        return [_record(r) for r in rows]

    def open_sessions(self) -> list[SessionRecord]:
        """Answered 200 and not ended: what a start after a crash must close or adopt."""
        with self._lock:
            rows = self._db.execute(f"select {', '.join(_COLUMNS)} from sessions "
                                    "where status = 200 and ended_at is null").fetchall()
        return [_record(r) for r in rows]

    def usage(self, client: str, since: float, until: float) -> dict[str, Any]:
        """Sessions by end cause, session seconds and refused triggers, received in [since, until)."""
        with self._lock:
            rows = self._db.execute(
                "select coalesce(end_cause, case when status = 200 then 'open' else 'refused' end), count(*), "
                "sum(case when joined_at is not null and ended_at is not null then max(0, ended_at - joined_at) "
                "else 0 end) from sessions where client = ? and received_at >= ? and received_at < ? group by 1",
                (client, since, until),
            ).fetchall()
        by_cause = {cause: count for cause, count, _ in rows}
        return {"client": client, "sessions": by_cause, "session_seconds": sum(s or 0.0 for _, _, s in rows),
                "refused": by_cause.get("refused", 0)}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(**dict(zip(_COLUMNS, row, strict=True)))
