"""Bad input gets a clear 4xx and changes nothing; the gateway stays responsive."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from tests.support import Client, metric_value, wait_until

VALID = {"agent": "support", "room_name": "room-valid"}


def _snapshot(serve) -> dict:
    return {cid: (p["idle"], p["leased"], sorted(w["id"] for w in p["workers"])) for cid, p in serve.stats().items()}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lk_a, lk_b, log_root):
    from tests.support import Serve, write_config

    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    beta = Client("beta", lk_b, min_idle=1, max_size=1)
    workdir = tmp_path_factory.mktemp("gateway")
    env = write_config(workdir / "clients.yaml", [alpha, beta])
    (log_root / workdir.name).mkdir()
    serve = Serve(workdir / "clients.yaml", env, log_root / workdir.name / "serve.log").start()
    yield serve, alpha, beta
    serve.stop()


CASES = [
    # (name, token, headers, raw body, expected status, expected error)
    ("no token", None, {}, {"client_id": "alpha", **VALID}, 401, "unauthorized"),
    ("wrong token", "not-a-token-of-anyone", {}, {"client_id": "alpha", **VALID}, 401, "unauthorized"),
    ("admin token is not a client token", "ADMIN", {}, {"client_id": "alpha", **VALID}, 401, "unauthorized"),
    ("another client's id", "ALPHA", {}, {"client_id": "beta", **VALID}, 403, "forbidden"),
    ("unknown client", "ALPHA", {}, {"client_id": "nobody", **VALID}, 404, "unknown_client"),
    ("unknown agent", "ALPHA", {}, {"client_id": "alpha", "agent": "ghost", "room_name": "r1"}, 404, "unknown_agent"),
    ("not json", "ALPHA", {}, b"{not json", 400, "malformed_json"),
    ("json array", "ALPHA", {}, b"[1, 2]", 400, "malformed_json"),
    ("missing room", "ALPHA", {}, {"client_id": "alpha", "agent": "support"}, 422, "invalid_body"),
    ("bad room name", "ALPHA", {}, {"client_id": "alpha", "agent": "support", "room_name": "../etc"}, 422, "invalid_body"),
    ("unknown field", "ALPHA", {}, {"client_id": "alpha", **VALID, "priority": 1}, 422, "invalid_body"),
    ("bad email", "ALPHA", {}, {"client_id": "alpha", **VALID, "user_email": "nope"}, 422, "invalid_body"),
    ("context not an object", "ALPHA", {}, {"client_id": "alpha", **VALID, "context": "x"}, 422, "invalid_body"),
    ("oversize context", "ALPHA", {}, {"client_id": "alpha", **VALID, "context": {"x": "y" * 20_000}}, 422, "invalid_body"),
    ("oversize body", "ALPHA", {}, b'{"pad": "' + b"x" * 70_000 + b'"}', 413, "body_too_large"),
]


@pytest.mark.parametrize("name,token,headers,body,status,code", CASES, ids=[c[0] for c in CASES])
def test_bad_trigger_is_refused_and_changes_nothing(gateway, name, token, headers, body, status, code):
    serve, alpha, beta = gateway
    wait_until(lambda: serve.pool("alpha")["idle"] == 1, 60, "alpha warm")
    before = _snapshot(serve)
    token = {"ALPHA": alpha.token, "ADMIN": serve.admin}.get(token, token)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = serve.request("POST", "/api/v1/trigger", raw=raw, token=token, headers=headers)
    assert r.status == status, r.body
    assert r.body["error"] == code
    assert _snapshot(serve) == before


def test_admin_endpoints_need_the_admin_token(gateway):
    serve, alpha, _ = gateway
    assert serve.get("/api/v1/containers/pool/stats").status == 401
    assert serve.get("/api/v1/containers/pool/stats", token=alpha.token).status == 401
    assert serve.request("POST", "/api/v1/admin/reload", token=alpha.token).status == 401
    # Fault injection is off unless configured: the route does not exist.
    assert serve.request("POST", "/api/v1/admin/fault/crash-pool/alpha", token=serve.admin).status == 404


def test_no_idle_worker_is_a_503_with_retry_after(gateway, lk_a):
    serve, alpha, _ = gateway
    wait_until(lambda: serve.pool("alpha")["idle"] == 1, 60, "alpha warm")
    first = serve.trigger(alpha, "room-only-one")
    assert first.status == 200
    second = serve.trigger(alpha, "room-no-worker")
    assert second.status == 503 and second.headers["Retry-After"] == "1"
    assert second.body["error"] == "no_idle_worker"
    assert serve.pool("alpha")["leased"] == 1
    assert serve.pool("alpha")["missed_total"] >= 1
    wait_until(lambda: lk_a.active_agents("room-only-one"), 30, "the agent in the room")
    lk_a.delete_room("room-only-one")
    wait_until(lambda: serve.pool("alpha")["leased"] == 0, 30, "the session to end")


def test_responses_and_stats_carry_no_secret(gateway):
    serve, alpha, beta = gateway
    stats = serve.get("/api/v1/containers/pool/stats", token=serve.admin)
    text = json.dumps(stats.body) + serve.metrics()
    for secret in (alpha.token, beta.token, alpha.project.secret, beta.project.secret, serve.admin):
        assert secret not in text


def test_health_and_readiness(gateway):
    serve, _, _ = gateway
    assert serve.get("/healthz").body == {"status": "ok"}
    assert serve.get("/readyz").status in (200, 503)


def test_livekit_failure_is_a_502_and_the_lease_goes_back(run_serve, log_root):
    from tests.support import start_livekit

    project = start_livekit(log_root, "doomed")
    try:
        doomed = Client("doomed", project, min_idle=1, max_size=1)
        serve = run_serve([doomed])
        worker_ids = [w["id"] for w in serve.pool("doomed")["workers"]]
        project.server.stop()  # LiveKit goes away after the worker registered
        r = serve.trigger(doomed, "room-doomed")
        assert r.status == 502, r.body
        assert r.body["error"] == "livekit_error"
        pool = serve.pool("doomed")
        assert pool["leased"] == 0 and [w["id"] for w in pool["workers"]] == worker_ids
    finally:
        project.server.stop()


def test_livekit_webhooks_are_verified_with_the_clients_own_keys(run_serve, log_root):
    from livekit import api

    from runtime.devserver import LiveKitServer, free_port
    from tests.support import LiveKitProject, new_secret

    gateway_port = free_port()
    secret = new_secret("hooked-lk-secret")
    server = LiveKitServer(
        {"hookedkey": secret},
        log_path=log_root / "livekit-hooked.log",
        webhook_urls=[f"http://127.0.0.1:{gateway_port}/api/v1/webhooks/livekit/hooked"],
    ).start()
    try:
        project = LiveKitProject(server, "hookedkey", secret)
        hooked = Client("hooked", project, min_idle=1, max_size=1)
        serve = run_serve([hooked], gateway={"host": "127.0.0.1", "port": gateway_port})
        assert serve.trigger(hooked, "room-hooked").status == 200
        wait_until(lambda: project.active_agents("room-hooked"), 30, "the agent in the room")
        project.delete_room("room-hooked")
        wait_until(
            lambda: metric_value(serve.metrics(), "autonomite_livekit_webhooks_total", client="hooked",
                                 event="room_finished") == 1,
            30, "LiveKit's signed room_finished webhook",
        )
        before = serve.metrics()

        # A forged event: right shape, signed with another key pair.
        body = '{"event": "room_finished", "room": {"name": "room-hooked"}}'
        body_hash = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        forged = api.AccessToken("hookedkey", "not-the-secret-" + "x" * 20).with_sha256(body_hash).to_jwt()
        path = "/api/v1/webhooks/livekit/hooked"
        r = serve.request("POST", path, raw=body.encode(), headers={"Authorization": forged})
        assert r.status == 401 and r.body["error"] == "invalid_signature"
        assert serve.request("POST", path, raw=body.encode()).status == 401  # unsigned
        assert serve.request("POST", "/api/v1/webhooks/livekit/nobody", raw=body.encode()).status == 404
        key = ("autonomite_livekit_webhooks_total", {"client": "hooked", "event": "room_finished"})
        assert metric_value(serve.metrics(), key[0], **key[1]) == metric_value(before, key[0], **key[1])
    finally:
        server.stop()
