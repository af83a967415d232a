"""The Supabase watcher's own decisions, with an in-memory table in place of PostgREST
(tests/integration/test_supabase.py runs the same paths against the real stack)."""

from __future__ import annotations

import logging

import pytest

from runtime.clients import source as client_source
from runtime.clients.source import SourceUnavailable, SourceWatcher
from runtime.clients.store import AccessRefused, save_cache
from runtime.metrics import Metrics
from runtime.settings import SupabaseSettings
from tests.support import metric_value, wait_until
from tests.unit.test_client_store import good


class Table:
    """The rows a read returns, or the error it raises."""

    def __init__(self, rows: list[dict]) -> None:
        self.contents, self.error = rows, None

    def rows(self) -> list[dict]:
        if self.error is not None:
            raise self.error
        return [dict(r) for r in self.contents]


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
