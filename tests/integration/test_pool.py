"""Pool behaviour under load, crashes and reloads, against real workers and livekit-servers."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import pytest
import yaml

from tests.support import Client, metric_value, new_secret, pid_alive, wait_until


def test_scaler_grows_to_max_and_shrinks_back_to_min_idle(run_serve, backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=3)
    scaler = {"interval_s": 0.2, "high_water": 0.8, "low_water": 0.3, "scale_down_after_s": 2}
    serve = run_serve([alpha], scaler=scaler, **backend)
    seen_totals: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            pool = serve.pool("alpha")
            seen_totals.append(pool["total"] + pool["draining"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rooms: list[str] = []

    def lease_whatever_is_idle() -> bool:
        if serve.pool("alpha")["idle"]:
            r = serve.trigger(alpha, f"room-load-{len(rooms)}")
            if r.status == 200:
                rooms.append(r.body["room_name"])
        return serve.pool("alpha")["leased"] == 3

    try:
        wait_until(lease_whatever_is_idle, 90, "utilization held at 100% until max_size")
        pool = serve.pool("alpha")
        assert pool["total"] == 3 and pool["leased"] == 3
        assert serve.trigger(alpha, "room-one-too-many").status == 503
        # The scaler raised the target to max_size, and nothing went past it.
        wait_until(lambda: serve.pool("alpha")["target"] == 3, 10, "target at max_size")

        for room in rooms:
            wait_until(lambda: lk_a.active_agents(room), 30, f"agent in {room}")
            lk_a.delete_room(room)
        # Sessions end; the pool refills to its target, then shrinks after the window.
        wait_until(lambda: serve.pool("alpha")["leased"] == 0, 60, "sessions to end")
        wait_until(lambda: serve.pool("alpha")["target"] == 1, 30, "scale-down after the stabilization window")
        wait_until(lambda: (p := serve.pool("alpha"))["total"] == 1 and p["draining"] == 0, 60, "back at min_idle")
    finally:
        stop.set()
        watcher.join()
    assert max(seen_totals) <= 3, "the pool went past max_size"
    text = serve.metrics()
    assert metric_value(text, "autonomite_scale_events_total", client="alpha", direction="up") >= 1
    assert metric_value(text, "autonomite_scale_events_total", client="alpha", direction="down") >= 1
    # Only idle workers were stopped: every leased one ended its own session.
    assert metric_value(text, "autonomite_worker_exits_total", client="alpha", cause="session_end") == len(rooms)
    assert metric_value(text, "autonomite_worker_exits_total", client="alpha", cause="scaled_down") >= 1
    assert metric_value(text, "autonomite_worker_exits_total", client="alpha", cause="session_failed") == 0


def test_crashed_pool_is_restarted_and_adopts_its_workers(run_serve, backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha], fault_injection=True, supervisor={"max_restarts": 3, "within_s": 60}, **backend)
    serve.start_session(alpha, "room-adopt")
    wait_until(lambda: serve.pool("alpha")["idle"] == 2, 60, "idle floor refilled")
    before = {w["id"]: w["state"] for w in serve.pool("alpha")["workers"]}

    assert serve.request("POST", "/api/v1/admin/fault/crash-pool/alpha", token=serve.admin).status == 200
    wait_until(
        lambda: metric_value(serve.metrics(), "autonomite_actor_restarts_total", actor="pool") == 1, 10, "a restart"
    )
    after = wait_until(
        lambda: (p := serve.pool("alpha")) and p["starting"] == 0 and {w["id"]: w["state"] for w in p["workers"]},
        30,
        "the restarted pool to settle",
    )
    assert after == before, "the restarted pool must adopt exactly the workers that were running"
    # The adopted leased worker still ends its session normally.
    lk_a.delete_room("room-adopt")
    wait_until(lambda: serve.pool("alpha")["leased"] == 0, 30, "the adopted session to end")


def test_exceeding_restart_intensity_exits_nonzero(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    serve = run_serve([alpha], fault_injection=True, supervisor={"max_restarts": 2, "within_s": 60})
    pids = [int(w["ref"]) for w in serve.pool("alpha")["workers"]]
    for restarts in (1, 2):
        assert serve.request("POST", "/api/v1/admin/fault/crash-pool/alpha", token=serve.admin).status == 200
        wait_until(
            lambda: metric_value(serve.metrics(), "autonomite_actor_restarts_total", actor="pool") == restarts,
            10,
            f"restart number {restarts}",
        )
    try:  # the third crash within the window is one too many: serve goes down, maybe mid-answer
        serve.request("POST", "/api/v1/admin/fault/crash-pool/alpha", token=serve.admin)
    except OSError:
        pass
    code = serve.proc.wait(60)
    assert code != 0
    assert "restart intensity exceeded" in serve.log()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 20, "workers to be gone")


def test_reload_adds_changes_and_removes_clients(run_serve, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha])
    config = yaml.safe_load(serve.config.read_text())
    original = serve.config.read_text()

    # A bad reload changes nothing and says why.
    serve.config.write_text(original.replace("min_idle: 1", "min_idle: 5"))
    r = serve.request("POST", "/api/v1/admin/reload", token=serve.admin)
    assert r.status == 422 and "min_idle (5) must not exceed max_size (2)" in r.body["detail"]
    assert serve.pool("alpha")["min_idle"] == 1
    assert serve.request("POST", "/api/v1/admin/reload", token=alpha.token).status == 401

    # Add beta, on its own server.
    beta_token = new_secret("beta-token")
    config["clients"].append(
        {
            "id": "beta",
            "name": "Beta",
            "api_token": beta_token,  # literal in the file is allowed too
            "livekit": {"url": lk_b.url, "api_key": lk_b.key, "api_secret": lk_b.secret},
            "pool": {"min_idle": 1, "max_size": 1},
            "agents": [{"name": "sales", "system_prompt": "Sell."}],
        }
    )
    serve.config.write_text(original.split("clients:")[0] + yaml.safe_dump({"clients": config["clients"]}))
    r = serve.request("POST", "/api/v1/admin/reload", token=serve.admin)
    assert r.status == 200 and r.body["added"] == ["beta"], r.body
    wait_until(lambda: serve.pool("beta").get("idle") == 1, 60, "beta's pool to warm up")

    # Change alpha's agent catalog while one worker is in a session: the idle worker is
    # replaced, the leased one finishes its session untouched.
    leased_id = serve.start_session(alpha, "room-reload").body["worker_id"]
    wait_until(lambda: serve.pool("alpha")["idle"] == 1, 60, "the idle floor")
    old_idle = {w["id"] for w in serve.pool("alpha")["workers"] if w["state"] == "idle"}
    config["clients"][0]["agents"][0]["system_prompt"] = "You are even more helpful."
    serve.config.write_text(original.split("clients:")[0] + yaml.safe_dump({"clients": config["clients"]}))
    r = serve.request("POST", "/api/v1/admin/reload", token=serve.admin)
    assert r.body["changed"] == ["alpha"], r.body
    wait_until(
        lambda: (p := serve.pool("alpha"))["idle"] == 1 and not old_idle & {w["id"] for w in p["workers"]},
        60,
        "alpha's idle worker to be replaced",
    )
    states = {w["id"]: w["state"] for w in serve.pool("alpha")["workers"]}
    assert states[leased_id] == "leased"
    lk_a.delete_room("room-reload")
    wait_until(lambda: leased_id not in {w["id"] for w in serve.pool("alpha")["workers"]}, 30, "the session to end")

    # Remove beta, this time with SIGHUP: its pool drains and goes away.
    beta_pids = [int(w["ref"]) for w in serve.pool("beta")["workers"]]
    serve.config.write_text(original.split("clients:")[0] + yaml.safe_dump({"clients": config["clients"][:1]}))
    serve.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "beta" not in serve.stats(), 30, "beta's pool to stop")
    wait_until(lambda: not any(pid_alive(p) for p in beta_pids), 20, "beta's workers to exit")
    text = serve.metrics()
    assert metric_value(text, "autonomite_worker_exits_total", client="alpha", cause="reconfigured") >= 1
    assert metric_value(text, "autonomite_worker_exits_total", client="alpha", cause="session_end") == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_metrics_pass_promtool_and_carry_no_secret(run_serve, lk_a, tmp_path):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha])
    assert serve.trigger(alpha, "room-metrics").status == 200
    text = serve.metrics()
    for name in (
        "autonomite_pool_workers",
        "autonomite_pool_utilization",
        "autonomite_triggers_total",
        "autonomite_dispatch_latency_seconds_bucket",
        "autonomite_worker_start_to_ready_seconds_bucket",
    ):
        assert name in text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for secret in (alpha.token, lk_a.secret, serve.admin):
        assert secret not in text
    lk_a.delete_room("room-metrics")
