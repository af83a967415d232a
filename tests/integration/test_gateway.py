"""Bad input gets a clear 4xx and changes nothing; the gateway stays responsive."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import pytest

from runtime.backends.ports import free_port
from tests.support import Client, livekit_signature, metric_value, new_secret, wait_until

VALID = {"agent": "support", "room_name": "room-valid"}
STATS, RELOAD, TRIGGER = "/api/v1/containers/pool/stats", "/api/v1/admin/reload", "/api/v1/trigger"


def _snapshot(serve) -> dict:
    return {cid: (p["idle"], p["leased"], sorted(w["id"] for w in p["workers"])) for cid, p in serve.stats().items()}


def _gateway(**settings) -> dict:
    """``runtime.gateway`` settings on a fresh loopback port."""
    return {"host": "127.0.0.1", "port": free_port(), **settings}


def raw_request(port: int, method: str, path: str, headers: dict[str, bytes] | None = None, body: bytes = b"",
                source: str = "127.0.0.1", timeout: float = 15.0) -> tuple[int, dict, dict]:
    """One request as raw bytes (urllib will not send a header that is not latin-1 text).

    Sent from ``source``, any loopback address, so a test can be two clients at once.
    Returns the status, the headers (names lowercased) and the JSON body.
    """
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: " + str(len(body)).encode()]
    lines += [name.encode() + b": " + value for name, value in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        return _read_response(s)


def _read_response(s: socket.socket) -> tuple[int, dict, dict]:
    data = b""
    while chunk := s.recv(65536):  # the server closes after answering (Connection: close)
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(payload)


def _closed(s: socket.socket) -> bool:
    """Whether the server closed this non-blocking socket."""
    try:
        return s.recv(1024) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def _trickle(s: socket.socket) -> bool:
    """Send one more byte of a request head (trickling does not buy time); False if closed."""
    try:
        s.send(b"n")
        return True
    except OSError:
        return False


def _signed(project, body: str) -> dict[str, str]:
    """The Authorization header LiveKit would send with ``body``, signed with ``project``'s keys."""
    return {"Authorization": livekit_signature(project.key, project.secret, body)}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lk_a, lk_b, log_root):
    from tests.support import Serve, write_config

    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    beta = Client("beta", lk_b, min_idle=1, max_size=1)
    workdir = tmp_path_factory.mktemp("gateway")
    # These tests send many bad tokens on purpose, all from 127.0.0.1: no throttling here
    # (test_failed_authentications_are_throttled_per_address tests it).
    env = write_config(workdir / "clients.yaml", [alpha, beta], gateway=_gateway(auth_failures={"max": 10_000}))
    (log_root / workdir.name).mkdir()
    serve = Serve(workdir / "clients.yaml", env, log_root / workdir.name / "serve.log")
    try:  # stopped even when it never becomes ready
        yield serve.start(), alpha, beta
    finally:
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
    # Hostile input: refused cleanly, never a 500.
    ("deep json array", "ALPHA", {}, b"[" * 990 + b"]" * 990, 400, "malformed_json"),
    ("deep json unclosed", "ALPHA", {}, b"[" * 990, 400, "malformed_json"),
    ("deep context", "ALPHA", {}, {"client_id": "alpha", **VALID, "context": json.loads('{"a":' * 40 + "1" + "}" * 40)},
     400, "malformed_json"),
    ("body not utf-8", "ALPHA", {}, b'{"client_id": "alpha\xff", "agent": "support", "room_name": "r"}', 400, "malformed_json"),
    ("lone surrogate in context", "ALPHA", {},
     b'{"client_id": "alpha", "agent": "support", "room_name": "r", "context": {"name": "\\ud800"}}', 422, "invalid_body"),
    ("lone surrogate in a context key", "ALPHA", {},
     b'{"client_id": "alpha", "agent": "support", "room_name": "r", "context": {"a": [{"\\udc00": 1}]}}', 422, "invalid_body"),
    ("lone surrogate in agent", "ALPHA", {},
     b'{"client_id": "alpha", "agent": "\\ud800", "room_name": "r"}', 422, "invalid_body"),
    ("email with a trailing newline", "ALPHA", {}, {"client_id": "alpha", **VALID, "user_email": "x@y\n"}, 422, "invalid_body"),
    ("latin-1 bearer token", "caf\u00e9-token-0123456789", {}, {"client_id": "alpha", **VALID}, 401, "unauthorized"),
]
# The 422 cases above whose refusal must name the field at fault, and the 400s' details.
FIELD_AT_FAULT = {"lone surrogate in context": "context", "lone surrogate in a context key": "context",
                  "lone surrogate in agent": "agent", "email with a trailing newline": "user_email"}
DETAIL_SAYS = {"deep json array": "deeper than 32", "deep json unclosed": "deeper than 32",
               "deep context": "deeper than 32", "body not utf-8": "not UTF-8"}


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
    assert set(r.body) >= {"error", "detail"}
    if name in FIELD_AT_FAULT:
        assert FIELD_AT_FAULT[name] in [f["field"] for f in r.body["fields"]], r.body
    if name in DETAIL_SAYS:
        assert DETAIL_SAYS[name] in r.body["detail"], r.body
    assert _snapshot(serve) == before


@pytest.mark.parametrize("method,path", [("POST", TRIGGER), ("GET", STATS), ("POST", RELOAD)])
@pytest.mark.parametrize("authorization", [b"Bearer \xff\xfe\xfd-not-utf-8", "Bearer caf\u00e9-0123456789".encode(),
                                           b"\xc3\x28"], ids=["not-utf-8", "utf-8-non-ascii", "bare-bytes"])
def test_an_authorization_header_that_is_not_ascii_is_a_401(gateway, method, path, authorization):
    serve, _, _ = gateway
    before = _snapshot(serve)
    body = json.dumps({"client_id": "alpha", **VALID}).encode() if method == "POST" else b""
    status, _, answer = raw_request(serve.port, method, path, {"Authorization": authorization}, body)
    assert (status, answer["error"]) == (401, "unauthorized"), answer
    assert _snapshot(serve) == before


def test_unknown_paths_and_methods_are_json_refusals(gateway):
    serve, _, _ = gateway
    missing, wrong_method = serve.get("/api/v1/nowhere"), serve.get(TRIGGER)
    for r in (missing, wrong_method):
        assert r.headers["Content-Type"].startswith("application/json"), r.body
    assert (missing.status, missing.body["error"]) == (404, "not_found")
    assert (wrong_method.status, wrong_method.body["error"]) == (405, "method_not_allowed")
    assert wrong_method.headers["Allow"] == "POST"
    assert set(missing.body) == set(wrong_method.body) == {"error", "detail"}


def test_admin_endpoints_need_the_admin_token(gateway):
    serve, alpha, _ = gateway
    for r in (serve.get(STATS), serve.get(STATS, token=alpha.token), serve.request("POST", RELOAD, token=alpha.token)):
        assert (r.status, r.body["error"]) == (401, "unauthorized")
    # Fault injection is off unless configured: the route does not exist.
    r = serve.request("POST", "/api/v1/admin/fault/crash-pool/alpha", token=serve.admin)
    assert (r.status, r.body["error"]) == (404, "not_found")


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
    wait_until(lambda: sorted(cid for cid, p in serve.stats().items() if p["idle"] >= p["min_idle"]) == ["alpha", "beta"],
               60, "both pools warm")
    for token in (None, serve.admin):
        r = serve.get("/readyz", token=token)
        assert (r.status, r.body) == (200, {"status": "ready"})


def test_only_the_admin_learns_which_clients_are_warming(run_serve):
    # A LiveKit that nobody serves: the worker never registers, so the pool stays cold.
    nowhere = SimpleNamespace(url=f"ws://127.0.0.1:{free_port()}", key="coldkey", secret=new_secret("cold-lk-secret"))
    cold = Client("cold", nowhere, min_idle=1, max_size=1)
    serve = run_serve([cold], wait_ready=False)
    for token in (None, "not-the-admin-token-0123456789"):
        r = serve.get("/readyz", token=token)
        assert (r.status, r.body) == (503, {"status": "warming"})
    r = serve.get("/readyz", token=serve.admin)
    assert (r.status, r.body) == (503, {"status": "warming", "waiting_for": ["cold"]})


def test_a_hung_livekit_is_a_502_and_the_lease_goes_back(run_serve, log_root):
    """LiveKit frozen (SIGSTOP): the worker still looks registered, the claim succeeds, and
    CreateDispatch never answers. The caller gets 502 in bounded time; the worker's claim is
    released and the lease returned, so the same worker serves once LiveKit is back."""
    import signal

    from tests.support import start_livekit

    project = start_livekit(log_root, "doomed")
    try:
        doomed = Client("doomed", project, min_idle=1, max_size=1)
        serve = run_serve([doomed])
        worker_ids = [w["id"] for w in serve.pool("doomed")["workers"]]
        project.server._proc.send_signal(signal.SIGSTOP)
        try:
            r = serve.trigger(doomed, "room-doomed")
        finally:
            project.server._proc.send_signal(signal.SIGCONT)
        assert r.status == 502, r.body
        assert r.body["error"] == "livekit_error" and "secret" not in r.body["detail"].lower()
        pool = wait_until(lambda: (p := serve.pool("doomed"))["idle"] == 1 and p, 30, "the worker idle again")
        assert pool["leased"] == 0 and [w["id"] for w in pool["workers"]] == worker_ids
        serve.start_session(doomed, "room-after")  # and it serves the next caller
        answered = lambda: [(s["room"], s["status"], s["error"])  # noqa: E731 - written a moment after
                            for s in serve.get("/api/v1/sessions", token=doomed.token).body["sessions"]]
        wait_until(lambda: len(answered()) == 2 and answered()[-1][1], 10, "both answers on the record")
        assert answered() == [
            ("room-doomed", 502, "livekit_error"), ("room-after", 200, None)]
    finally:
        project.server.stop()


def test_livekit_webhooks_are_verified_with_the_clients_own_keys(run_serve, log_root):
    from runtime.backends.ports import free_port
    from runtime.dev.devserver import LiveKitServer
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
        body = '{"event": "room_finished", "id": "EV_forged", "room": {"name": "room-hooked"}}'
        forged = livekit_signature("hookedkey", "not-the-secret-" + "x" * 20, body)
        path = "/api/v1/webhooks/livekit/hooked"
        r = serve.request("POST", path, raw=body.encode(), headers={"Authorization": forged})
        assert r.status == 401 and r.body["error"] == "invalid_signature"
        assert serve.request("POST", path, raw=body.encode()).status == 401  # unsigned
        key = ("autonomite_livekit_webhooks_total", {"client": "hooked", "event": "room_finished"})
        assert metric_value(serve.metrics(), key[0], **key[1]) == metric_value(before, key[0], **key[1])
    finally:
        server.stop()


def test_a_webhook_for_an_unknown_client_looks_like_a_bad_signature(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=0, max_size=1)
    serve = run_serve([alpha])
    body = '{"event": "room_started", "id": "EV_probe", "room": {"name": "r"}}'
    signed = _signed(lk_a, body)  # validly signed, with alpha's own key pair
    answers = [serve.request("POST", f"/api/v1/webhooks/livekit/{cid}", raw=body.encode(), headers=signed)
               for cid in ("nobody", "alpha-typo")]
    forged = dict(signed, Authorization=signed["Authorization"][:-4] + "AAAA")
    answers.append(serve.request("POST", "/api/v1/webhooks/livekit/alpha", raw=body.encode(), headers=forged))
    assert [(r.status, r.body) for r in answers] == [
        (401, {"error": "invalid_signature", "detail": "the webhook is not signed with this client's key"})
    ] * 3


def test_a_signed_webhook_that_is_no_event_is_refused_and_not_counted(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=0, max_size=1)
    serve = run_serve([alpha])

    def deliver(body: str):
        return serve.request("POST", "/api/v1/webhooks/livekit/alpha", raw=body.encode(), headers=_signed(lk_a, body))

    for body, field in [("{}", "event"), ('{"event": "room_started", "createdAt": "soon"}', "createdAt"),
                        ('{"event": "room_started", "room": {"name": ["a"]}}', "room.name")]:
        answer = deliver(body)
        assert (answer.status, answer.body["error"], [f["field"] for f in answer.body["fields"]]) == (
            422, "invalid_body", [field]), body
    # A name LiveKit never sends is answered (a newer server is not retried forever) but
    # counted as "other": a caller never mints a metric label.
    assert deliver('{"event": "made_up_event", "id": "EV_new"}').body == {"received": "made_up_event"}
    counted = {line.split(" ")[0] for line in serve.metrics().splitlines()
               if line.startswith("autonomite_livekit_webhooks_total")}
    assert counted == {'autonomite_livekit_webhooks_total{client="alpha",event="other"}'}


def test_a_replayed_webhook_event_is_answered_but_counted_once(run_serve, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=0, max_size=1)
    beta = Client("beta", lk_b, min_idle=0, max_size=1)
    serve = run_serve([alpha, beta])

    def deliver(client: Client, event_id: str):
        body = json.dumps({"event": "participant_joined", "id": event_id, "room": {"name": "room-replay"}})
        return serve.request("POST", f"/api/v1/webhooks/livekit/{client.id}", raw=body.encode(),
                             headers=_signed(client.project, body))

    def count(client: Client) -> float:
        return metric_value(serve.metrics(), "autonomite_livekit_webhooks_total", client=client.id,
                            event="participant_joined")

    answers = [deliver(alpha, "EV_once") for _ in range(3)]
    assert [(r.status, r.body) for r in answers] == [(200, {"received": "participant_joined"})] + [
        (200, {"received": "participant_joined", "duplicate": True})] * 2
    assert count(alpha) == 1
    # Ids are remembered per client: the same id from another client is another event.
    assert deliver(beta, "EV_once").body == {"received": "participant_joined"}
    assert deliver(alpha, "EV_twice").body == {"received": "participant_joined"}
    assert (count(alpha), count(beta)) == (2, 1)


def test_failed_authentications_are_throttled_per_address(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=0, max_size=1)
    window_s = 6
    serve = run_serve([alpha], gateway=_gateway(auth_failures={"max": 4, "window_s": window_s}))
    wrong = {"Authorization": b"Bearer not-a-token-of-anyone-0123"}
    admin = {"Authorization": f"Bearer {serve.admin}".encode()}
    hook = b'{"event": "room_started", "id": "EV_x"}'
    # Four failures from 127.0.0.2, one on each kind of guarded endpoint...
    failures = [raw_request(serve.port, "POST", TRIGGER, wrong, b"{}", source="127.0.0.2"),
                raw_request(serve.port, "GET", STATS, wrong, source="127.0.0.2"),
                raw_request(serve.port, "POST", RELOAD, wrong, source="127.0.0.2"),
                raw_request(serve.port, "POST", "/api/v1/webhooks/livekit/alpha", wrong, hook, source="127.0.0.2")]
    assert [(status, body.get("error")) for status, _, body in failures] == [
        (401, "unauthorized")] * 3 + [(401, "invalid_signature")]
    # ...and that address is refused, even with the right token: a guess must not be confirmed.
    status, headers, body = raw_request(serve.port, "GET", STATS, admin, source="127.0.0.2")
    assert (status, body.get("error")) == (429, "too_many_failures")
    assert 1 <= int(headers["retry-after"]) <= window_s
    # Probes without a token are never throttled; a token on /readyz is checked like any other.
    assert raw_request(serve.port, "GET", "/readyz", source="127.0.0.2")[0] == 200
    assert raw_request(serve.port, "GET", "/readyz", admin, source="127.0.0.2")[0] == 429
    for _ in range(4):  # else /readyz would be an unthrottled oracle for the admin token
        assert raw_request(serve.port, "GET", "/readyz", wrong, source="127.0.0.3")[0] == 200
    assert raw_request(serve.port, "GET", STATS, admin, source="127.0.0.3")[0] == 429
    # Another address is served, and its own failures are its own.
    assert raw_request(serve.port, "GET", STATS, admin)[0] == 200
    assert raw_request(serve.port, "GET", STATS, wrong)[0] == 401
    # Once the window has passed, 127.0.0.2 is served again.
    wait_until(lambda: raw_request(serve.port, "GET", STATS, admin, source="127.0.0.2")[0] == 200,
               window_s + 3, "the failure window to pass")


def test_slow_request_heads_are_cut_off_while_others_are_served(run_serve, lk_a):
    header_timeout_s = 1.5
    alpha = Client("alpha", lk_a, min_idle=0, max_size=1)
    serve = run_serve([alpha], gateway=_gateway(header_timeout_s=header_timeout_s))
    held: dict[socket.socket, float] = {}  # socket -> when it was opened
    closed_after: dict[socket.socket, float] = {}
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", serve.port), timeout=5)
            held[s] = time.monotonic()
            s.sendall(b"POST /api/v1/trigger HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")  # half a head
            s.setblocking(False)
        # Meanwhile, whole requests are served.
        assert serve.get("/healthz").status == 200
        assert "alpha" in serve.stats()

        def all_closed() -> bool:
            for i, (s, opened) in enumerate(held.items()):
                if s not in closed_after and (_closed(s) or (i % 2 and not _trickle(s))):
                    closed_after[s] = time.monotonic() - opened
            return len(closed_after) == len(held)

        wait_until(all_closed, header_timeout_s + 5, "the gateway to close 20 half-sent request heads")
        assert min(closed_after.values()) >= header_timeout_s * 0.9
        assert serve.get("/healthz").status == 200
    finally:
        for s in held:
            s.close()


def test_a_slow_body_is_a_408_and_changes_nothing(run_serve, lk_a):
    body_timeout_s = 1.5
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    serve = run_serve([alpha], gateway=_gateway(body_timeout_s=body_timeout_s))
    before = _snapshot(serve)
    body = json.dumps({"client_id": "alpha", **VALID}).encode()
    head = (f"POST {TRIGGER} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {alpha.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", serve.port), timeout=body_timeout_s + 10) as s:
        started = time.monotonic()
        s.sendall(head + body[:10])  # and the rest never comes
        status, headers, answer = _read_response(s)
        waited = time.monotonic() - started
    assert (status, answer["error"]) == (408, "request_timeout")
    assert headers["connection"].lower() == "close"
    assert body_timeout_s * 0.9 <= waited <= body_timeout_s + 5
    assert _snapshot(serve) == before
