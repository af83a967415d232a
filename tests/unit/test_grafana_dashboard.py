"""docs/grafana-dashboard.json: Grafana's schema, valid PromQL, and only labels the runtime has.

No Grafana can be installed here (Debian has no ``grafana`` package; PyPI's ``grafana`` is an
empty placeholder), so the dashboard is checked against Grafana Labs' own generated models
(``grafana-foundation-sdk``, the Grafana 11.6 line): decoded into them and encoded again,
every key and value must survive, so a key Grafana's dashboard schema does not have fails.
Each query is checked by ``promtool check rules`` as a recording rule. That its metric names
are really exported is checked against a live runtime's scrape in
``tests/integration/test_metrics_listener.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from runtime.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(autonomite_[a-z_]+)\b")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")
_LABEL_VALUES = re.compile(r"label_values\((.+),\s*([a-z_]+)\)")
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def load() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of the client variable."""
    found = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
             for p in dashboard["panels"] for t in p.get("targets", [])]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":  # Grafana's label_values(selector, label): the same as this PromQL
            selector, label = _LABEL_VALUES.fullmatch(v["query"]["query"]).groups()
            found.append((f"variable {v['name']}", f"group by ({label}) ({selector})"))
    return found


def as_promql(expr: str) -> str:
    """What Grafana sends Prometheus: its variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$client", ".*")


def _lost(original: object, decoded: object, path: str = "") -> list[str]:
    """Where ``decoded`` lacks or changed something of ``original`` (it may add defaults)."""
    if isinstance(original, dict):
        if not isinstance(decoded, dict):
            return [f"{path}: became {type(decoded).__name__}"]
        return [lost for k, v in original.items()
                for lost in ([f"{path}.{k}: not in Grafana's schema"] if k not in decoded
                             else _lost(v, decoded[k], f"{path}.{k}"))]
    if isinstance(original, list):
        if not isinstance(decoded, list) or len(decoded) != len(original):
            return [f"{path}: list changed"]
        return [lost for i, (a, b) in enumerate(zip(original, decoded, strict=True)) for lost in _lost(a, b, f"{path}[{i}]")]
    return [] if original == decoded else [f"{path}: {original!r} became {decoded!r}"]


def test_every_key_of_the_dashboard_is_in_grafanas_schema():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()  # the panel and Prometheus query models, so those are checked too
    original = load()
    decoded = json.loads(json.dumps(Dashboard.from_json(original), cls=JSONEncoder))
    assert _lost(original, decoded) == []
    broken = {**original, "panels": [{**original["panels"][1], "gridpos": {}}]}  # the check itself catches a typo
    assert _lost(broken, json.loads(json.dumps(Dashboard.from_json(broken), cls=JSONEncoder))) != []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_every_query_is_valid_promql(tmp_path):
    rules = [{"record": f"autonomite_dashboard:query_{i}", "expr": as_promql(expr)}
             for i, (_, expr) in enumerate(queries(load()))]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout


def _labels_of_every_metric() -> dict[str, set[str]]:
    """Label names per exported series, from the runtime's own metric definitions."""
    labels: dict[str, set[str]] = {}
    for collector in Metrics().registry._collector_to_names:  # the one list of collectors
        for family in collector.describe():
            names = set(getattr(collector, "_labelnames", ()))
            for series in (family.name, *(family.name + s for s in _SERIES_SUFFIXES)):
                labels[series] = names | ({"le"} if family.type == "histogram" else set())
    return labels


def test_every_query_uses_only_labels_its_metrics_have_and_filters_by_the_client_variable():
    known = _labels_of_every_metric()
    for where, expr in queries(load()):
        metrics = set(METRIC.findall(expr))
        assert metrics and metrics <= known.keys(), f"{where}: unknown metric in {expr}"
        available = set().union(*(known[m] for m in metrics))
        used = {name.strip() for group in _GROUPING.findall(expr) for name in group.split(",") if name.strip()}
        used |= set(_MATCHER.findall(expr))
        assert used <= available, f"{where}: labels {used - available} are not on {metrics}"
        if "client" in available and where.startswith("panel"):
            assert 'client=~"$client"' in expr, f"{where}: not filtered by the client variable"


def test_the_dashboard_covers_what_an_operator_needs_and_its_panels_do_not_overlap():
    dashboard = load()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["client"]["multi"] and variables["client"]["includeAll"]
    used = {m for _, expr in queries(dashboard) for m in METRIC.findall(expr)}
    assert used >= {
        "autonomite_pool_workers", "autonomite_pool_utilization", "autonomite_scaler_threshold",
        "autonomite_triggers_total", "autonomite_dispatch_latency_seconds_bucket",
        "autonomite_worker_start_to_ready_seconds_bucket", "autonomite_actor_restarts_total",
        "autonomite_worker_exits_total",
    }
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        assert panel["type"] == "row" or panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
