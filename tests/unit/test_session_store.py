"""The embedded session store (SQLite, WAL): parts of a record merge, pages are stable, a
crash loses nothing committed, and usage adds up."""

from __future__ import annotations

import os
import subprocess
import sys

from runtime.sessions.store import SessionRecord, SqliteStore


def test_a_record_arrives_in_parts_and_each_part_keeps_what_the_others_said(tmp_path):
    store = SqliteStore(tmp_path / "sessions.db")
    store.put(SessionRecord("s1", "acme", agent="support", room="r1", received_at=100.0))
    store.put(SessionRecord("s1", "acme", status=200, worker_id="w1", answered_at=100.3))
    store.put(SessionRecord("s1", "acme", joined_at=100.4, user_joined_at=101.0))
    store.put(SessionRecord("s1", "acme", end_cause="user_left", ended_at=160.4))
    got = store.get("s1")
    assert got == SessionRecord("s1", "acme", agent="support", room="r1", worker_id="w1", status=200,
                                end_cause="user_left", received_at=100.0, answered_at=100.3, joined_at=100.4,
                                user_joined_at=101.0, ended_at=160.4)
    assert got.seconds == 60.0
    version, shipped = store._read("select version, shipped from sessions where id = 's1'")[0]
    assert (version, shipped) == (4, 0)  # each part is a change the shipper must send


def test_pages_by_client_and_time_with_a_stable_cursor(tmp_path):
    store = SqliteStore(tmp_path / "sessions.db")
    for i in range(7):
        store.put(SessionRecord(f"s{i}", "acme" if i % 2 == 0 else "globex", received_at=float(i // 2)))
    acme = store.page(client="acme", limit=2)
    assert [r.id for r in acme] == ["s0", "s2"]
    rest = store.page(client="acme", after=(acme[-1].received_at, acme[-1].id), limit=10)
    assert [r.id for r in rest] == ["s4", "s6"]
    assert [r.id for r in store.page(since=1.0, until=3.0)] == ["s2", "s3", "s4", "s5"]


def test_usage_counts_sessions_by_cause_their_seconds_and_the_refused(tmp_path):
    store = SqliteStore(tmp_path / "sessions.db")
    store.put(SessionRecord("a", "acme", status=200, received_at=10, joined_at=11, ended_at=71, end_cause="user_left"))
    store.put(SessionRecord("b", "acme", status=200, received_at=20, joined_at=21, ended_at=51, end_cause="no_show"))
    store.put(SessionRecord("c", "acme", status=503, error="no_idle_worker", received_at=30))
    store.put(SessionRecord("d", "acme", status=200, received_at=40, joined_at=41))  # still going
    store.put(SessionRecord("e", "globex", status=200, received_at=15, joined_at=16, ended_at=99, end_cause="user_left"))
    store.write([], {("acme", 0): 30.0, ("acme", 1): 12.5, ("acme", 5): 99.0})  # minute 5: after the range
    usage = store.usage("acme", 0, 100)["acme"]
    assert usage["sessions"] == {"user_left": 1, "no_show": 1, "refused": 1, "open": 1}
    assert usage["session_seconds"] == 90.0 and usage["refused"] == 1
    assert usage["idle_worker_seconds"] == 42.5
    assert set(store.usage(None, 0, 100)) == {"acme", "globex"}
    assert [r.id for r in store.open_sessions()] == ["d"]


def test_a_sigkill_of_the_writer_loses_no_committed_record(tmp_path):
    path = tmp_path / "sessions.db"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from runtime.sessions.store import SessionRecord, SqliteStore\n"
        f"s = SqliteStore(Path({str(path)!r}))\n"
        "for i in range(50):\n"
        "    s.put(SessionRecord(f's{i}', 'acme', status=200, received_at=float(i)))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ}, cwd=os.getcwd())
    assert done.returncode == -9
    assert len(SqliteStore(path).page(limit=1000)) == 50


def test_a_file_an_older_runtime_wrote_gets_the_columns_added_since(tmp_path):
    import sqlite3

    path = tmp_path / "sessions.db"
    old = sqlite3.connect(path)
    old.executescript(  # the table as the first release wrote it: no owner column
        "create table sessions (id text primary key, client text not null, agent text, room text, worker_id text, "
        "backend text, livekit_url text, user_hash text, status integer, error text, end_cause text, "
        "received_at real, answered_at real, joined_at real, user_joined_at real, ended_at real, "
        "version integer not null default 1, shipped integer not null default 0);"
        "insert into sessions (id, client, status, received_at) values ('s0', 'acme', 200, 1.0);")
    old.commit()
    old.close()
    store = SqliteStore(path, owner="me")
    assert [r.id for r in store.open_sessions()] == ["s0"]
    store.put(SessionRecord("s0", "acme", end_cause="user_left", ended_at=2.0))
    assert store.open_sessions() == []
