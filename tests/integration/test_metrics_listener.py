"""/metrics on a listener of its own (``runtime.metrics``), or on the gateway by default; and the
Grafana dashboard asks only for series a live runtime really exports."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from runtime.backends.ports import free_port
from tests.support import Client, metric_value, wait_until, write_config
from tests.unit.test_grafana_dashboard import METRIC, load, queries


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET on loopback."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def test_with_runtime_metrics_set_only_that_listener_serves_metrics(run_serve, lk_a):
    port = free_port()
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    serve = run_serve([alpha], metrics={"host": "127.0.0.1", "port": port})
    on_gateway = serve.get("/metrics")
    assert (on_gateway.status, on_gateway.body) == (404, {"error": "not_found", "detail": "Not Found"})
    status, content_type, text = http_get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    assert metric_value(text, "autonomite_pool_workers", client="alpha", state="idle") == 1
    assert metric_value(text, "autonomite_scaler_threshold", bound="high_water") == 0.8
    for secret in (alpha.token, lk_a.secret, serve.admin):
        assert secret not in text
    # The metrics listener serves nothing else, and refuses in the gateway's JSON shape.
    status, content_type, body = http_get(port, "/api/v1/containers/pool/stats")
    assert (status, json.loads(body)["error"]) == (404, "not_found") and content_type.startswith("application/json")
    assert serve.get("/readyz").status == 200  # the gateway itself is unchanged
    assert serve.stop() == 0
    assert refused(port) and refused(serve.port)


def test_a_metrics_port_already_taken_is_a_clear_exit(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = write_config(tmp_path / "clients.yaml", [], workers={"zygote": False},
                           metrics={"host": "127.0.0.1", "port": port})
        done = subprocess.run([sys.executable, "-m", "runtime.server.cli", "serve", "--config", str(tmp_path / "clients.yaml")],
                              env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot listen for the metrics on 127.0.0.1:{port}: " in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def exported_series(text: str) -> set[str]:
    """Every series name an exposition can carry, from its ``# TYPE`` lines (a labelled metric
    has them before its first sample)."""
    suffixes = {"counter": ("", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}
    series = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = name.removesuffix("_total") if kind == "counter" else name
        series |= {(name if kind == "counter" and not s else base + s) for s in suffixes.get(kind, ("",))}
    return series


def test_by_default_the_gateway_serves_metrics_and_the_dashboard_asks_only_for_exported_series(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha])  # no runtime.metrics: as before it existed
    r = serve.request("GET", "/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert serve.trigger(alpha, "room-dashboard").status == 200  # counters and histograms get samples too
    wait_until(lambda: alpha.project.active_agents("room-dashboard"), 30, "the agent in the room")
    text = serve.metrics()
    series = exported_series(text)
    assert {"autonomite_triggers_total", "autonomite_dispatch_latency_seconds_bucket"} <= series
    for where, expr in queries(load()):
        missing = set(METRIC.findall(expr)) - series
        assert not missing, f"{where}: {missing} not exported by the runtime"
    assert metric_value(text, "autonomite_scaler_threshold", bound="low_water") == 0.3
    alpha.project.delete_room("room-dashboard")
