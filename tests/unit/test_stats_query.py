"""The admin stats route's query and totals: pure, so every edge is checked in milliseconds."""

from __future__ import annotations

import pytest

from actors.messages import PoolStats
from runtime.http.models import StatsQuery, parse_stats_query, summarize


def test_the_defaults_and_each_parameter():
    assert parse_stats_query({}) == StatsQuery(None, 100, None)
    assert parse_stats_query({"client": "acme"}) == StatsQuery("acme", 100, None)
    assert parse_stats_query({"limit": "1000", "cursor": "c-0042"}) == StatsQuery(None, 1000, "c-0042")


@pytest.mark.parametrize("query", [
    {"limit": "0"}, {"limit": "1001"}, {"limit": "-1"}, {"limit": "ten"}, {"limit": "１"},  # a full-width digit
    {"limit": ""}, {"cursor": ""}, {"client": "x" * 65}, {"page": "2"},
])
def test_a_bad_query_is_refused_with_its_reason(query):
    with pytest.raises(ValueError) as e:
        parse_stats_query(query)
    assert str(e.value)


def test_totals_add_the_running_pools_and_count_the_configured_clients():
    busy = PoolStats("a", 1, 2, 3, 0, 1, 8, 6, 4, 0.0, (), waiting=2)
    quiet = PoolStats("b", 0, 1, 0, 1, 1, 4, 1, 0, 0.0, ())
    assert summarize(10_000, [busy, quiet]) == {
        "clients": 10_000, "running_pools": 2, "starting": 1, "idle": 3, "leased": 3, "draining": 1,
        "waiting": 2, "missed_total": 4,
    }
    assert PoolStats.stopped("z", 0, 4).as_json()["pool"] == "stopped"
    assert summarize(3, [])["running_pools"] == 0
