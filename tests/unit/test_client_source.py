"""The Supabase watcher's own decisions, with an in-memory table in place of PostgREST
(tests/integration/test_supabase.py runs the same paths against the real stack)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from runtime.clients import source as client_source
from runtime.clients.source import SourceUnavailable, SourceWatcher
from runtime.clients.store import AccessRefused, save_cache
from runtime.metrics import Metrics
from runtime.settings import ReloadSummary, SupabaseSettings
from tests.support import metric_value, wait_until
from tests.unit.test_client_store import good


class Table:
    """An in-memory clients table: each row written gets a newer ``updated_at``, as the
    real table's trigger gives it; every read returns the rows, or raises ``error``."""

    def __init__(self, rows: list[dict]) -> None:
        self.error: Exception | None = None
        self._rows: dict[str, dict] = {}
        self._clock = 0
        self.reads: list[int] = []  # how many rows each read returned
        self.contents = rows

    @property
    def contents(self) -> list[dict]:
        return list(self._rows.values())

    @contents.setter
    def contents(self, rows: list[dict]) -> None:
        written = {}
        for row in rows:
            old = self._rows.get(row["id"])
            same = old is not None and {k: v for k, v in old.items() if k != "updated_at"} == \
                {k: v for k, v in row.items() if k != "updated_at"}
            if not same:
                self._clock += 1
            stamp = old["updated_at"] if same else (BASE + timedelta(seconds=self._clock)).isoformat()
            written[row["id"]] = {**row, "updated_at": stamp}
        self._rows = written

    def _answer(self, rows: list[dict]) -> list[dict]:
        if self.error is not None:
            raise self.error
        self.reads.append(len(rows))
        return [dict(r) for r in rows]

    def rows(self) -> list[dict]:
        return self._answer(self.contents)

    def changed_since(self, stamp: str) -> list[dict]:
        return self._answer([r for r in self.contents if datetime.fromisoformat(r["updated_at"]) >
                             datetime.fromisoformat(stamp)])

    def rows_by_id(self, ids) -> list[dict]:
        return self._answer([r for r in self.contents if r["id"] in set(ids)])

    def versions(self) -> dict[str, str]:
        return {r["id"]: r["updated_at"] for r in self._answer(self.contents)}


BASE = datetime(2026, 11, 24, tzinfo=UTC)


def watcher(table: Table, **settings) -> SourceWatcher:
    return SourceWatcher(SupabaseSettings(url="http://127.0.0.1:9", service_key="k", **settings), Metrics(), table)


def test_a_crashed_poll_is_logged_counted_shown_as_down_and_the_loop_polls_on(monkeypatch, caplog):
    table = Table([good()])
    w = watcher(table, poll_interval_s=0.02)
    w.first_read()
    real_merge, bug = client_source.merge, [True]

    def merge_with_a_bug(last_good, snapshot):  # fault injection: the bug's text holds a secret
        if bug:
            raise KeyError("s3cret-value")
        return real_merge(last_good, snapshot)

    monkeypatch.setattr(client_source, "merge", merge_with_a_bug)
    applied = []
    w.start(applied.append)
    try:
        wait_until(lambda: metric_value(w.metrics.render().decode(), "autonomite_client_source_watcher_crashes_total")
                   >= 2, 5, "two crashed polls to be counted: the loop polls on")
        status = w.status()
        assert not status["up"] and status["down_reason"].startswith("crashed: KeyError at test_client_source.py:")
        assert metric_value(w.metrics.render().decode(), "autonomite_client_source_up") == 0
        bug.clear()
        table.contents = [good(), good("globex")]  # a later change still arrives
        wait_until(lambda: applied and {c.id for c in applied[-1]} == {"acme", "globex"}, 5, "the next change")
        assert w.status()["up"] and w.status()["down_reason"] is None
    finally:
        w.stop()
    assert caplog.text.count("a poll crashed (KeyError at test_client_source.py:") == 1, "once per state change"
    assert "s3cret" not in caplog.text


def test_a_refused_key_live_keeps_the_served_set_and_says_why(caplog):
    table = Table([good()])
    w = watcher(table)
    served = w.first_read()
    table.error = AccessRefused("HTTP 401, 42501: permission denied for table clients")
    for _ in range(3):
        assert w.poll_once() is None
    assert list(w.clients.values()) == served
    assert w.status()["down_reason"] == "refused: HTTP 401, 42501: permission denied for table clients"
    assert caplog.text.count("Supabase refused the key") == 1
    table.error = None
    w.poll_once()
    assert w.status()["up"]


def test_a_refused_key_at_start_stops_even_with_a_cache(tmp_path):
    cache = tmp_path / "cache.json"
    save_cache(cache, list(watcher(Table([good()])).first_read()))
    table = Table([])
    table.error = AccessRefused("HTTP 401, 42501: permission denied for table clients")
    with pytest.raises(SourceUnavailable, match="refused the key .*permission denied for table clients"):
        watcher(table, cache_file=cache).first_read()


def test_a_restart_keeps_a_token_with_the_client_the_cache_says_held_it(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    cache = tmp_path / "cache.json"
    first = watcher(Table([good("zeta")]), cache_file=cache)
    first.first_read()
    # Both rows now hold zeta's token; "alpha" sorts first and was never served.
    rows = [good("alpha", api_token=good("zeta")["api_token"]), good("zeta")]
    assert [c.id for c in watcher(Table(rows), cache_file=cache).first_read()] == ["zeta"]
    assert [c.id for c in watcher(Table(rows)).first_read()] == []  # no cache: nobody can tell, nobody gets it


def applying(w: SourceWatcher) -> None:
    """What the runtime does with each new set: say what changed (Runtime.apply)."""
    served = list(w.clients.values())

    def apply(clients):
        nonlocal served
        summary, served = ReloadSummary.between(served, clients), clients
        return summary

    w.apply = apply


def test_a_poll_reads_what_changed_not_the_table():
    table = Table([good(f"c{i:04d}", api_token=f"c{i:04d}-token-0123456789abcdef") for i in range(2000)])
    w = watcher(table)
    w.first_read()
    applying(w)
    assert table.reads == [2000]
    assert w.poll_once() is None and table.reads[-1] <= 3  # the first read reaches back OVERLAP_S (2 rows here)
    assert w.poll_once() is None and table.reads[-1] == 0  # nothing changed: nothing read

    table.contents = [r if r["id"] != "c0100" else {**r, "name": "Renamed"} for r in table.contents]
    summary = w.poll_once()
    assert summary is not None and summary.changed == ["c0100"] and summary.added == summary.removed == []
    assert table.reads[-1] == 1  # that row, and nothing else of the 2,000
    assert w.clients["c0100"].name == "Renamed" and len(w.clients) == 2000
    assert metric_value(w.metrics.render().decode(), "autonomite_client_source_rows_read_total") <= 2000 + 3 + 1


def test_a_deleted_row_is_found_by_the_resync_or_at_once_when_notify_names_it():
    from runtime.clients.changes import RESYNC_EVERY

    table = Table([good("acme"), good("globex"), good("initech")])
    w = watcher(table)
    w.first_read()
    applying(w)
    table.contents = [r for r in table.contents if r["id"] != "globex"]
    removed = []
    for _ in range(RESYNC_EVERY):  # no updated_at says a row is gone: the resync does
        if (summary := w.poll_once()) is not None:
            removed += summary.removed
    assert removed == ["globex"] and set(w.clients) == {"acme", "initech"}

    table.contents = [r for r in table.contents if r["id"] != "initech"]
    w.changes.named("initech")  # a NOTIFY's payload names the row
    summary = w.poll_once()
    assert summary is not None and summary.removed == ["initech"]


def test_a_table_without_updated_at_is_read_whole_each_poll():
    from runtime.clients.changes import Changes

    changes = Changes()
    changes.took([{"id": "acme"}], (), whole=True)
    assert changes.plan().since is None
    changes.took([{"id": "acme", "updated_at": "2026-12-01T00:00:00+00:00"}], (), whole=True)
    assert changes.plan().since == "2026-11-30T23:59:58+00:00"  # just moved: reach back
    assert changes.plan().since == "2026-11-30T23:59:58+00:00"  # (a poll that crashed takes nothing)
    changes.took([], (), whole=False)  # a read that found nothing new
    assert changes.plan().since == "2026-12-01T00:00:00+00:00"
    changes.took([{"id": "late", "updated_at": "2026-12-02T00:00:00+00:00"}], (), whole=False, by_id=["late"])
    assert changes.plan().since == "2026-12-01T00:00:00+00:00"  # a row read by id moves nothing


def test_a_client_held_out_for_a_shared_token_is_served_once_the_holder_lets_it_go():
    table = Table([good("alpha", api_token="token-t-0123456789abcdef")])
    w = watcher(table)
    w.first_read()
    applying(w)
    table.contents = [*table.contents, good("beta", api_token="token-t-0123456789abcdef")]
    w.poll_once()
    assert "beta" in w.errors  # alpha holds the token
    table.contents = [good("alpha", api_token="token-u-0123456789abcdef"),
                      good("beta", api_token="token-t-0123456789abcdef")]
    for _ in range(3):  # alpha moves to another token; beta's row itself never changes
        w.poll_once()
    assert "beta" not in w.errors and set(w.clients) == {"alpha", "beta"}


def test_a_poll_that_crashed_after_reading_reads_the_change_again(monkeypatch):
    table = Table([good("acme")])
    w = watcher(table)
    w.first_read()
    applying(w)
    real_merge, bug = client_source.merge, [True]

    def merge_once_broken(last_good, snapshot):
        if bug:
            bug.clear()
            raise KeyError("a bug")
        return real_merge(last_good, snapshot)

    monkeypatch.setattr(client_source, "merge", merge_once_broken)
    table.contents = [good("acme", name="Renamed")]
    assert w.poll_once() is None  # crashed
    w.poll_once()
    assert w.clients["acme"].name == "Renamed"
