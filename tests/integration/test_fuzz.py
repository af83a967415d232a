"""Schemathesis against a live ``autonomite serve``, driven by the document the gateway serves.

Every documented operation is fuzzed with generated requests that fit the document (positive)
and that break it (negative), each sent with no token, with the right credential for it (the
client's token, the admin token, or LiveKit's signature over the very bytes sent), or with
someone else's. Bounded: ``MAX_EXAMPLES`` per operation and mode, so the whole module takes
well under two minutes on two cores. Asserted for every answer: no 5xx; the status, content
type, headers and body are as documented; every refusal is JSON ``{error, detail}``. Fault
injection stays off, so the crash route is fuzzed as the 404 it then is and no pool dies.
"""

from __future__ import annotations

import base64
import hashlib
import time

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from runtime.backends.ports import free_port
from runtime.http.openapi import OPENAPI_PATH, document, rendered
from tests.support import Client, Serve, wait_until, write_config

MAX_EXAMPLES = 50
OPERATIONS = [(method.upper(), path) for path, ops in document()["paths"].items() for method in ops]
WHO = ("nobody", "right", "wrong")  # which credential a generated request carries
# The one operation the right credential would end the module's serve with; its admitted
# answers are tested on a serve of their own (tests/integration/test_drain.py).
NOT_WITH_THE_RIGHT_TOKEN = {"/api/v1/admin/shutdown"}


@pytest.fixture(scope="module")
def live(tmp_path_factory, lk_a, log_root):
    """One serve for the module; auth failures are not throttled here (their 429 is tested in
    test_gateway.py), or the fuzzer's own 401s would soon turn every answer into a 429."""
    import schemathesis

    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    workdir = tmp_path_factory.mktemp("fuzz")
    gateway = {"host": "127.0.0.1", "port": free_port(), "auth_failures": {"max": 100_000}}
    env = write_config(workdir / "clients.yaml", [alpha], gateway=gateway)
    (log_root / workdir.name).mkdir()
    serve = Serve(workdir / "clients.yaml", env, log_root / workdir.name / "serve.log")
    try:
        serve.start()
        schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{serve.port}{OPENAPI_PATH}")
        yield serve, alpha, schema
    finally:
        serve.stop()


class LiveKitSigned(requests.auth.AuthBase):
    """LiveKit's webhook signature: a JWT whose sha256 claim is the hash of the body as sent."""

    def __init__(self, key: str, secret: str) -> None:
        self.key, self.secret = key, secret

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        from livekit import api

        body = r.body.encode() if isinstance(r.body, str) else (r.body or b"")
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        r.headers["Authorization"] = api.AccessToken(self.key, self.secret).with_sha256(digest).to_jwt()
        return r


def credentials(live, method: str, path: str, who: str, case) -> dict:
    """Keyword arguments for ``case.call``: the credential ``who`` stands for on this route."""
    serve, alpha, _ = live
    if who == "nobody":
        return {}
    if path.startswith("/api/v1/webhooks/"):
        if who == "right":
            case.path_parameters["client_id"] = "alpha"
            return {"auth": LiveKitSigned(alpha.project.key, alpha.project.secret)}
        return {"auth": LiveKitSigned(alpha.project.key, "not-" + alpha.project.secret)}
    right = alpha.token if path == "/api/v1/trigger" else serve.admin
    wrong = serve.admin if path == "/api/v1/trigger" else alpha.token  # a real token, of the other kind
    return {"headers": {"Authorization": f"Bearer {right if who == 'right' else wrong}"}}


def broken_as_sent(case, path: str, who: str) -> bool:
    """Whether a negative case still breaks the document once its credential is added: the
    right one mends a broken Authorization header (and, for a webhook, the client_id)."""
    negated = {location for location, c in case.meta.components.items() if c.mode.is_negative}
    mended = {"header", "path"} if path.startswith("/api/v1/webhooks/") else {"header"}
    return who != "right" or bool(negated - mended)


def is_refusal_shaped(path: str, response) -> bool:
    """Every answer of 400 or more is JSON {error: str, detail: str}; /readyz's 503 is a status."""
    if response.status_code < 400 or (path, response.status_code) == ("/readyz", 503):
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("detail"), str)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzzed_requests_get_documented_answers_and_never_a_5xx(live, method, path):
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    serve, _, schema = live
    operation = schema[path][method]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
    has_input = bool(operation.path_parameters or operation.query or operation.body)
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if has_input else [GenerationMode.POSITIVE]
    seen: set[int] = set()
    for mode in modes:
        mode_checks = checks + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

        who_may = [w for w in WHO if w != "right" or path not in NOT_WITH_THE_RIGHT_TOKEN]

        @given(case=operation.as_strategy(generation_mode=mode), who=st.sampled_from(who_may))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
        def fuzz(case, who) -> None:
            response = case.call(**credentials(live, method, path, who, case))
            case.validate_response(response, checks=mode_checks if broken_as_sent(case, path, who) else checks)
            assert is_refusal_shaped(path, response), (response.status_code, response.text[:300])
            seen.add(response.status_code)

        fuzz()
    assert seen and max(seen) < 500, seen
    assert serve.proc.poll() is None and "unhandled error" not in serve.log()


def test_every_documented_path_refuses_other_methods_as_json(live):
    serve, _, _ = live
    for path, ops in document()["paths"].items():
        concrete = path.replace("{client_id}", "alpha")
        allowed = {m.upper() for m in ops} | ({"HEAD"} if "get" in ops else set())
        r = requests.delete(f"http://127.0.0.1:{serve.port}{concrete}", timeout=10)
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed", (path, r.status_code, r.text)
        assert set(r.headers["Allow"].split(",")) == allowed, (path, r.headers["Allow"])
    r = requests.get(f"http://127.0.0.1:{serve.port}/api/v1/undocumented", timeout=10)
    assert (r.status_code, r.json()) == (404, {"error": "not_found", "detail": "Not Found"})


def test_the_served_document_is_the_repositorys_and_holds_no_secret(live):
    serve, alpha, _ = live
    r = requests.get(f"http://127.0.0.1:{serve.port}{OPENAPI_PATH}", timeout=10)  # no token needed
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.text == rendered()
    for secret in (alpha.token, alpha.project.secret, serve.admin):
        assert secret not in r.text
    assert "alpha" not in r.text  # nor a tenant's name


def test_a_signed_webhook_that_is_not_a_json_object_is_a_400_and_counts_nothing(live):
    """Found by the fuzz: protobuf's parser read a JSON string as an empty event, answered 200."""
    serve, alpha, _ = live
    before = serve.metrics()
    for body in (b'"+0.0"', b'["room_finished"]', b" \n[]"):
        r = requests.post(f"http://127.0.0.1:{serve.port}/api/v1/webhooks/livekit/alpha", data=body, timeout=10,
                          auth=LiveKitSigned(alpha.project.key, alpha.project.secret))
        assert (r.status_code, r.json()["error"]) == (400, "malformed_json"), (body, r.text)
    counted = lambda text: [line for line in text.splitlines() if line.startswith("autonomite_livekit_webhooks_total")]  # noqa: E731
    assert counted(serve.metrics()) == counted(before)


def test_a_real_trigger_answers_as_documented(live):
    """The one answer fuzzing cannot reach by chance: a 200 with an agent in the room. Last in
    the module, so the lease it takes cannot make a fuzzed /readyz see a warming pool."""
    serve, alpha, schema = live
    case = schema["/api/v1/trigger"]["POST"].Case(
        body={"client_id": "alpha", "agent": "support", "room_name": "room-fuzz", "user_email": "dana@example.com",
              "context": {"plan": "gold"}})
    started = time.monotonic()
    response = case.call_and_validate(headers={"Authorization": f"Bearer {alpha.token}"})
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 30
    wait_until(lambda: alpha.project.active_agents("room-fuzz"), 30, "the agent in the room")
    alpha.project.delete_room("room-fuzz")
