"""The session log (runtime/sessions/log.py): what the dispatcher, the gateway and the pools
tell it becomes one record per trigger, with the right end, on a real SQLite store."""

from __future__ import annotations

from agent.contract import Milestones
from runtime.metrics import Metrics
from runtime.sessions.log import SessionLog, _Progress, user_hash
from runtime.sessions.store import SqliteStore


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
