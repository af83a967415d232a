"""The session log (runtime/sessions/log.py): what the dispatcher, the gateway and the pools
tell it becomes one record per trigger, with the right end, on a real SQLite store."""

from __future__ import annotations

import logging
import sqlite3

from agent.contract import Milestones
from runtime.metrics import Metrics
from runtime.sessions.log import SessionLog, _Progress, user_hash
from runtime.sessions.store import SessionRecord, SqliteStore
from runtime.sessions.writes import Pending
from tests.support import wait_until


def _log(tmp_path, metrics=None) -> SessionLog:
    return SessionLog(SqliteStore(tmp_path / "sessions.sqlite"), "process", metrics).start()


def test_a_session_from_trigger_to_end_is_one_record_with_every_milestone(tmp_path):
    metrics = Metrics()
    log = _log(tmp_path, metrics)
    log.received("s1", "acme", "support", "room-1", user_hash("Dana@Example.com"), at=100.0)
    log.leased("s1", "acme", "w1", "ws://127.0.0.1:7880")
    log.progress("acme", "w1", Milestones(in_room=True))
    log.answered("s1", "acme", 200)
    log.progress("acme", "w1", Milestones(in_room=True, user_joined=True))
    log.progress("acme", "w1", Milestones(True, True, "user_left"))
    log.progress("acme", "w1", Milestones(True, True, "user_left"))  # told again: changes nothing
    log.worker_gone("acme", "w1", failed=False)  # its exit after its own report: the end stays
    assert log.flush()
    r = log.store.get("s1")
    assert r is not None and (r.status, r.worker_id, r.backend, r.end_cause) == (200, "w1", "process", "user_left")
    assert r.user_hash == user_hash("dana@example.com") and "dana" not in str(r)
    assert None not in (r.answered_at, r.joined_at, r.user_joined_at, r.ended_at)
    assert r.seconds is not None and r.seconds >= 0
    assert metrics.session_seconds.labels("acme")._value.get() == r.seconds
    assert log.open_count() == 0


def test_a_refusal_is_a_record_that_never_opens(tmp_path):
    log = _log(tmp_path)
    log.received("s1", "acme", "support", "room-1", None, at=1.0)
    log.answered("s1", "acme", 503, "no_idle_worker")
    log.refused("s2", "acme", "nobody", "room-2", None, 2.0, 404, "unknown_agent")
    assert log.flush()
    assert [(r.status, r.error, r.end_cause) for r in log.store.page()] == [
        (503, "no_idle_worker", None), (404, "unknown_agent", None)]
    assert log.open_count() == 0 and log.store.usage("acme", 0, 10)["acme"]["refused"] == 2


def test_a_worker_that_dies_mid_session_ends_it_as_worker_failed_and_a_retry_follows_the_new_worker(tmp_path):
    log = _log(tmp_path)
    log.received("s1", "acme", "support", "room-1", None, at=1.0)
    log.leased("s1", "acme", "w1", "ws://lk")
    log.leased("s1", "acme", "w2", "ws://lk")  # w1's handoff failed: the retry went to w2
    log.progress("acme", "w1", Milestones(True, False, "no_show"))  # w1 serves this session no more
    log.answered("s1", "acme", 200)
    log.progress("acme", "w2", Milestones(in_room=True))
    log.worker_gone("acme", "w2", failed=True)
    assert log.flush()
    r = log.store.get("s1")
    assert r is not None and (r.worker_id, r.end_cause) == ("w2", "worker_failed")


def test_a_restart_closes_what_the_last_runtime_left_open_unless_its_worker_lives_on(tmp_path):
    log = _log(tmp_path)
    for sid, worker in (("adopted", "w1"), ("gone", "w2")):
        log.received(sid, "acme", "support", f"room-{sid}", None, at=1.0)
        log.leased(sid, "acme", worker, "ws://lk")
        log.answered(sid, "acme", 200)
    log.received("unanswered", "acme", "support", "room-x", None, at=2.0)  # serve died before answering
    assert log.flush()
    log.stop()

    after = _log(tmp_path)  # the next start, on the same file
    assert after.open_count() == 3
    after.close_orphans({("acme", "w1")})  # w1 was adopted; w2 is gone
    after.progress("acme", "w1", Milestones(True, True, "room_finished"))  # the adopted worker's own end
    assert after.flush()
    causes = {r.id: r.end_cause for r in after.store.page()}
    assert causes == {"adopted": "room_finished", "gone": "runtime_restart", "unanswered": "runtime_restart"}
    assert after.open_count() == 0


def test_idle_seconds_add_up_by_minute_and_a_bad_event_does_not_stop_the_writer(tmp_path):
    log = _log(tmp_path)
    log.idle("acme", 1.5)
    log.idle("acme", 2.5)
    log.received("s1", "acme", "support", "room", None, at=1.0)
    log.leased("s1", "acme", "w1", "ws://lk")
    log._put(_Progress("acme", "w1", None, 2.0))  # type: ignore[arg-type]  # a bug's event: it raises
    log.received("s2", "acme", "support", "room", None, at=5.0)  # in the same batch: still written
    assert log.flush()
    assert log.store.get("s2") is not None
    assert log.store.usage("acme", 0, 10**10)["acme"]["idle_worker_seconds"] == 4.0


def test_a_worker_let_go_after_a_failed_handoff_does_not_end_the_session_it_no_longer_serves(tmp_path):
    log = _log(tmp_path)
    log.received("s1", "acme", "support", "room-1", None, at=1.0)
    log.leased("s1", "acme", "w1", "ws://lk")
    log.released("s1", "acme", "w1")  # not accepted: the trigger waits for another worker
    log.worker_gone("acme", "w1", failed=True)  # w1 is retired before the next worker is ready
    log.leased("s1", "acme", "w2", "ws://lk")
    log.answered("s1", "acme", 200)
    log.progress("acme", "w2", Milestones(True, True, "user_left"))
    assert log.flush()
    r = log.store.get("s1")
    assert r is not None and (r.worker_id, r.end_cause) == ("w2", "user_left")


def test_a_lease_moved_on_leaves_another_sessions_worker_alone(tmp_path):
    log = _log(tmp_path)
    for sid in ("s1", "s2"):
        log.received(sid, "acme", "support", f"room-{sid}", None, at=1.0)
    log.leased("s1", "acme", "w1", "ws://lk")
    log.leased("s2", "acme", "w2", "ws://lk")
    log.released("s1", "acme", "w2")  # a stale or wrong release: w2 is s2's
    log.leased("s1", "acme", "w3", "ws://lk")
    log.answered("s2", "acme", 200)
    log.progress("acme", "w2", Milestones(True, False, "no_show"))
    assert log.flush()
    s2 = log.store.get("s2")
    assert s2 is not None and s2.end_cause == "no_show"


def _events(store: SqliteStore) -> list[tuple[str, str]]:
    from runtime.sessions.store import connect

    with connect(store.path) as db:
        return db.execute("select session_id, event from webhook_outbox order by seq").fetchall()


def test_webhook_events_follow_the_session_even_when_its_end_is_heard_before_its_answer(tmp_path):
    log = SessionLog(SqliteStore(tmp_path / "sessions.sqlite"), "process", has_webhook=lambda c: c == "acme").start()
    log.received("fast", "acme", "support", "room-1", None, at=1.0)
    log.leased("fast", "acme", "w1", "ws://lk")
    log.progress("acme", "w1", Milestones(True, False, "room_deleted"))  # over before the 200 is told
    log.answered("fast", "acme", 200)
    log.received("slow", "acme", "support", "room-2", None, at=2.0)
    log.answered("slow", "acme", 503, "no_idle_worker")  # a refusal: no event
    log.received("other", "globex", "support", "room-3", None, at=3.0)  # no webhook: no event
    log.leased("other", "globex", "w9", "ws://lk")
    log.answered("other", "globex", 200)
    log.progress("globex", "w9", Milestones(True, True, "user_left"))
    assert log.flush()
    assert _events(log.store) == [("fast", "session.started"), ("fast", "session.ended")]
    assert log._answered == set()


def test_a_session_closed_at_a_restart_counts_no_seconds(tmp_path):
    metrics = Metrics()
    log = _log(tmp_path, metrics)
    log.received("s1", "acme", "support", "room", None, at=1.0)
    log.leased("s1", "acme", "w1", "ws://lk")
    log.answered("s1", "acme", 200)
    log.progress("acme", "w1", Milestones(in_room=True))
    assert log.flush()
    log.stop()
    after = _log(tmp_path, metrics)
    after.close_orphans(set())
    assert after.flush()
    r = after.store.get("s1")
    assert r is not None and r.end_cause == "runtime_restart" and r.seconds is None
    assert after.store.usage("acme", 0, 10**10)["acme"]["session_seconds"] == 0.0
    assert metrics.session_seconds.labels("acme")._value.get() == 0.0


def test_a_start_takes_over_only_the_open_sessions_of_a_runtime_that_is_gone(tmp_path):
    from runtime.sessions.owners import Owner

    old, gone = Owner(tmp_path), Owner(tmp_path)
    for owner, sid in ((old, "draining"), (gone, "crashed")):
        log = SessionLog(SqliteStore(tmp_path / "sessions.sqlite", owner=owner.id), "process").start()
        log.received(sid, "acme", "support", f"room-{sid}", None, at=1.0)
        log.leased(sid, "acme", f"w-{sid}", "ws://lk")
        log.answered(sid, "acme", 200)
        assert log.flush()
        log.stop()
    gone.release()  # its serve exited (or died: the kernel drops the lock either way)
    new = Owner(tmp_path)
    log = SessionLog(SqliteStore(tmp_path / "sessions.sqlite", owner=new.id), "process", alive=new.alive).start()
    assert log.open_count() == 1  # the crashed runtime's; the draining one closes its own
    log.close_orphans(set())
    assert log.flush()
    causes = {r.id: r.end_cause for r in log.store.page()}
    assert causes == {"draining": None, "crashed": "runtime_restart"}


def _locked(tmp_path) -> tuple[SessionLog, SqliteStore, sqlite3.Connection]:
    """A log on a store whose file another connection holds locked (a real SQLite lock,
    held longer than a write waits): roll ``holder`` back to let writes through."""
    store = SqliteStore(tmp_path / "sessions.sqlite", lock_wait_s=0.05)
    holder = sqlite3.connect(tmp_path / "sessions.sqlite", isolation_level=None)
    holder.execute("begin exclusive")
    return SessionLog(store, "process", None).start(), store, holder


def test_records_the_store_cannot_take_are_kept_and_written_once_it_can(tmp_path, caplog):
    log, store, holder = _locked(tmp_path)
    with caplog.at_level(logging.ERROR, "autonomite.sessions"):
        log.received("s1", "acme", "support", "room-1", None, at=1.0)
        log.answered("s1", "acme", 503, "no_idle_worker")
        assert log.flush()
    assert log.unwritten == 1 and store.get("s1") is None
    assert "cannot write 1 records (OperationalError: database is locked)" in caplog.text
    log.received("s2", "acme", "support", "room-2", None, at=2.0)  # while the store is still locked
    assert log.flush() and log.unwritten == 2
    holder.execute("rollback")
    wait_until(lambda: log.unwritten == 0, 30, "the kept records written")  # even with nothing new told
    assert [(r.id, r.status) for r in store.page()] == [("s1", 503), ("s2", None)] and log.dropped == 0
    holder.close()
    log.stop()


def test_a_record_the_store_refuses_as_bad_data_is_dropped_and_holds_up_no_other(tmp_path, caplog):
    # A bug's record (a value SQLite cannot bind) is not an outage: retrying it would stop
    # every record after it for good, and dropping its batch would lose the good ones in it.
    log = _log(tmp_path)
    with caplog.at_level(logging.ERROR, "autonomite.sessions"):
        log.received("before", "acme", "support", "room-0", None, at=0.5)
        log.received("bad", "acme", "support", "room-1", {"not": "a hash"}, at=1.0)  # type: ignore[arg-type]
        log.received("beside", "acme", "support", "room-2", None, at=1.5)
        assert log.flush()  # the three in one batch
    log.received("after", "acme", "support", "room-3", None, at=2.0)
    assert log.flush()
    assert [r.id for r in log.store.page()] == ["before", "beside", "after"] and (log.unwritten, log.lost) == (0, 1)
    assert "1 of 3 records could not be written and are lost" in caplog.text


def test_idle_seconds_alone_wait_out_a_lock_with_one_error_logged(tmp_path, caplog):
    log, store, holder = _locked(tmp_path)
    with caplog.at_level(logging.INFO, "autonomite.sessions"):
        for _ in range(3):  # three batches while the file is locked: one error, not three
            log.idle("acme", 10.0)
            assert log.flush()
        holder.execute("rollback")
        wait_until(lambda: store.usage("acme", 0, 2e9).get("acme", {}).get("idle_worker_seconds") == 30.0, 30,
                   "the idle seconds written")
    assert caplog.text.count("cannot write") == 1 and "the store writes again" in caplog.text
    holder.close()
    log.stop()


def test_what_is_kept_for_a_retry_is_bounded_oldest_first_with_its_webhook_events():
    pending = Pending()
    for i in range(5):
        pending.add([SessionRecord(f"s{i}", "acme", status=200), SessionRecord(f"s{i}", "acme", room=f"r{i}")])
        pending.announce.append((f"s{i}", "session.started"))
        pending.add_idle("acme", i, 1.0)
    assert pending.count == 5 and [p.room for p in pending.parts()] == ["r0", "r1", "r2", "r3", "r4"]
    assert pending.bound(limit=2) == 3
    assert [(p.id, p.status) for p in pending.parts()] == [("s3", 200), ("s4", 200)]
    assert pending.announce == [("s3", "session.started"), ("s4", "session.started")]
    assert list(pending.idle) == [("acme", 3), ("acme", 4)]


def test_a_stop_right_after_a_failed_write_tries_once_more_before_giving_up(tmp_path):
    log, store, holder = _locked(tmp_path)
    log.received("s1", "acme", "support", "room-1", None, at=1.0)
    assert log.flush() and log.unwritten == 1  # failed: the next timed try is a second away
    holder.execute("rollback")
    log.stop()  # its flush tries at once: the session's record is not lost to the retry timer
    assert store.get("s1") is not None and log.lost == 0
    holder.close()
