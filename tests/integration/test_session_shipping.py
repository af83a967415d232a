"""Session records from the embedded SQLite store to Supabase's ``sessions`` table: a real
PostgREST over a real PostgreSQL behind nginx (``tests/supabase_stack.py``), outages made
by stopping PostgREST, restarts by a new shipper on the same file."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

import pytest

from runtime.sessions.shipper import Shipper
from runtime.sessions.store import FILE_NAME, SessionRecord, SqliteStore
from runtime.settings import SupabaseSettings
from tests.integration import test_supabase
from tests.supabase_stack import SupabaseStack
from tests.support import wait_until

stack = test_supabase.stack  # one stack for this module, started and stopped as there
FAST_BACKOFF = (0.2, 1.0)  # an outage here lasts seconds: the default's 30 s cap would only slow the test


@pytest.fixture
def sessions(stack: SupabaseStack):
    """The ``sessions`` table through supabase-py with the service key, emptied for each test."""
    from supabase import create_client

    stack.sql("delete from public.sessions")
    return create_client(stack.url, stack.service_key).table("sessions")


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path / FILE_NAME)
    yield s
    s.close()


@pytest.fixture
def shipper(stack: SupabaseStack, store: SqliteStore):
    """Start a shipper on the test's store; every one started is stopped at the end."""
    started: list[Shipper] = []

    def start(key: str | None = None, **options) -> Shipper:
        settings = SupabaseSettings(url=stack.url, service_key=key or stack.service_key)
        s = Shipper(store.path, settings, **{"interval_s": 0.2, "backoff_s": FAST_BACKOFF, **options})
        started.append(s)
        s.start()
        return s

    yield start
    for s in started:
        assert s.stop(), "the shipper's thread ended within its bound"


def rows(sessions) -> dict[str, dict]:
    found = sessions.select("*").execute().data
    assert len({r["id"] for r in found}) == len(found)
    return {r["id"]: r for r in found}


def epoch(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


def test_records_reach_the_table_and_a_later_change_updates_the_same_row(sessions, store, shipper):
    now = time.time()
    store.put(SessionRecord(id="s-1", client="alpha", agent="support", room="room-1", worker_id="w-1", backend="process",
                            livekit_url="ws://127.0.0.1:7880", user_hash="u-abc", status=200, received_at=now,
                            answered_at=now + 0.25, joined_at=now + 1.5))
    s = shipper()
    row = wait_until(lambda: rows(sessions).get("s-1"), 15, "the record in Supabase")
    assert {k: row[k] for k in ("client", "agent", "room", "worker_id", "backend", "livekit_url", "user_hash", "status")} == {
        "client": "alpha", "agent": "support", "room": "room-1", "worker_id": "w-1", "backend": "process",
        "livekit_url": "ws://127.0.0.1:7880", "user_hash": "u-abc", "status": 200}
    assert row["error"] is None and row["end_cause"] is None and row["ended_at"] is None
    assert epoch(row["received_at"]) == pytest.approx(now, abs=1e-5)  # timestamptz keeps microseconds
    assert epoch(row["joined_at"]) == pytest.approx(now + 1.5, abs=1e-5)
    assert row["received_at"].endswith("+00:00")
    first_update = row["updated_at"]

    store.put(SessionRecord(id="s-1", client="alpha", end_cause="user_left", ended_at=now + 60, user_joined_at=now + 2))
    s.wake()
    row = wait_until(lambda: (r := rows(sessions)["s-1"])["ended_at"] and r, 15, "the end to arrive")
    assert len(rows(sessions)) == 1, "the same row, updated"
    assert row["end_cause"] == "user_left" and epoch(row["ended_at"]) == pytest.approx(now + 60, abs=1e-5)
    assert row["room"] == "room-1", "what the change did not carry stays"
    assert epoch(row["updated_at"]) > epoch(first_update)
    status = s.status()
    assert status["pending"] == 0 and status["shipped_total"] == 2 and status["failures_total"] == 0
    assert status["last_error"] is None and status["last_shipped_at"] >= now


def test_records_written_in_an_outage_arrive_once_when_it_ends(sessions, store, shipper, stack, caplog):
    caplog.set_level(logging.INFO, logger="runtime.sessions.shipper")
    n, now = 50, time.time()
    stack.stop_postgrest()
    try:
        s = shipper()
        for i in range(n):
            store.put(SessionRecord(id=f"o-{i:02d}", client="alpha" if i % 2 else "beta", status=200, received_at=now + i))
        for i in range(0, n, 2):  # half of them end while Supabase is still down
            store.put(SessionRecord(id=f"o-{i:02d}", client="beta", end_cause="room_finished", ended_at=now + i + 30))
        s.wake()
        wait_until(lambda: s.status()["failures_total"] >= 2, 15, "failed attempts")
        status = s.status()
        assert status["pending"] == n and status["shipped_total"] == 0 and status["last_error"]
        assert stack.sql("select count(*) from public.sessions").strip() == "0"
    finally:
        stack.start_postgrest()
    wait_until(lambda: s.status()["pending"] == 0, 15, "every record kept to be shipped")
    found = rows(sessions)
    assert sorted(found) == [f"o-{i:02d}" for i in range(n)]
    for i in range(n):
        r = found[f"o-{i:02d}"]
        assert epoch(r["received_at"]) == pytest.approx(now + i, abs=1e-5)
        if i % 2:
            assert r["end_cause"] is None and r["ended_at"] is None
        else:
            assert r["end_cause"] == "room_finished" and epoch(r["ended_at"]) == pytest.approx(now + i + 30, abs=1e-5)
    assert s.status()["shipped_total"] == n, "each record sent once: its changes in the outage went as one"
    assert caplog.text.count("session shipper: cannot ship") == 1, "one line per outage, not per attempt"
    assert "reachable again" in caplog.text
    assert stack.service_key not in caplog.text + str(s.status())


def test_a_new_shipper_on_the_same_file_ships_what_a_stopped_one_left(sessions, store, shipper, stack):
    stack.stop_postgrest()
    try:
        first = shipper()
        for i in range(10):
            store.put(SessionRecord(id=f"r-{i}", client="alpha", status=200, received_at=time.time()))
        first.wake()
        wait_until(lambda: first.status()["failures_total"] >= 1, 15, "a failed attempt")
        assert first.stop()
    finally:
        stack.start_postgrest()
    assert first.status()["pending"] is None, "a stopped shipper has closed its connection"
    second = shipper()
    wait_until(lambda: len(rows(sessions)) == 10 and second.status()["pending"] == 0, 15, "the records left behind")
    assert second.status()["shipped_total"] == 10


def test_a_row_supabase_refuses_is_set_aside_and_the_others_flow(sessions, store, shipper, caplog):
    now = time.time()
    store.put(SessionRecord(id="good-1", client="alpha", received_at=now))
    store.put(SessionRecord(id="bad", client="alpha", end_cause="exploded", received_at=now + 1))  # type: ignore[arg-type]
    store.put(SessionRecord(id="good-2", client="alpha", received_at=now + 2))
    s = shipper()
    wait_until(lambda: s.status()["pending"] == 0, 15, "the batch, row by row")
    assert sorted(rows(sessions)) == ["good-1", "good-2"]
    status = s.status()
    assert status["rejected_total"] == 1 and status["shipped_total"] == 2 and status["failures_total"] == 0
    assert "rejected session bad (HTTP 400: 23514, new row for relation" in caplog.text

    store.put(SessionRecord(id="good-3", client="alpha", received_at=now + 3))  # and later rows still flow
    s.wake()
    wait_until(lambda: "good-3" in rows(sessions), 15, "a later record")


@pytest.mark.parametrize("fault", ["the anon key", "no such table"])
def test_a_refusal_that_is_not_about_the_rows_keeps_them_all(sessions, store, shipper, stack, fault):
    for i in range(3):
        store.put(SessionRecord(id=f"k-{i}", client="alpha", received_at=time.time()))
    s = shipper(key=stack.anon_key) if fault == "the anon key" else shipper(table="no_such_table")
    wait_until(lambda: s.status()["failures_total"] >= 2, 15, "failed attempts")
    status = s.status()
    assert status["pending"] == 3 and status["rejected_total"] == 0 and status["shipped_total"] == 0
    assert status["last_error"].startswith("HTTP 401: 42501, " if fault == "the anon key" else "HTTP 404")
    assert stack.anon_key not in status["last_error"]


def test_the_anon_key_can_neither_read_nor_write_sessions(sessions, store, shipper, stack):
    from postgrest import APIError
    from supabase import create_client

    store.put(SessionRecord(id="private", client="alpha", user_hash="u-secret", received_at=time.time()))
    shipper()
    wait_until(lambda: "private" in rows(sessions), 15, "the record, with the service key")
    anon = create_client(stack.url, stack.anon_key).table("sessions")
    with pytest.raises(APIError) as read:
        anon.select("*").execute()
    assert read.value.code == "42501"  # permission denied for table sessions
    with pytest.raises(APIError) as write:
        anon.insert({"id": "forged", "client": "alpha"}).execute()
    assert write.value.code == "42501"
    assert sorted(rows(sessions)) == ["private"]


def test_the_schema_applies_again_over_itself_and_gives_clients_a_webhook(stack):
    from tests.supabase_stack import SCHEMA

    stack.sql(SCHEMA.read_text())  # a project that applied an older copy runs the file again
    assert stack.sql("select data_type from information_schema.columns where table_name = 'clients' "
                     "and column_name = 'webhook'").strip() == "jsonb"
    assert stack.sql("select relrowsecurity from pg_class where relname = 'sessions'").strip() == "t"
