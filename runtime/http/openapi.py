"""The gateway's OpenAPI 3.1 document: built here, served at ``GET /api/v1/openapi.json``.

This module is the one source of truth; ``docs/openapi.json`` is its output
(``python -m runtime.openapi > docs/openapi.json``), kept so the API can be read without
running anything, and a unit test fails when the two differ. The trigger body's schema is
``TriggerBody``'s own, so the document says what the gateway validates, not a copy of it;
``tests/unit/test_openapi.py`` checks that its (method, path) pairs are exactly the routes
``create_app`` registers, so a route cannot be added without being documented.

Every status below is one a handler or the ``json_errors`` middleware really answers with;
each refusal names the error codes it can carry, so a fuzzer that meets an undocumented
code or shape fails (``tests/integration/test_fuzz.py``). The document holds no secret and
no tenant name, so it is served without authentication.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, get_args

from aiohttp import web

from actors.pool_effects import WorkerState
from agent.contract import EndCause
from runtime.http.models import SESSIONS_MAX_LIMIT, STATS_MAX_LIMIT, DispatchErrorCode, ErrorCode, TriggerBody

OPENAPI_PATH = "/api/v1/openapi.json"
ERROR_CODES = [*get_args(ErrorCode), *get_args(DispatchErrorCode)]

_STR, _BOOL = {"type": "string"}, {"type": "boolean"}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """A closed JSON object: the answers never carry keys the document does not name."""
    props = {**required, **(optional or {})}
    return {"type": "object", "required": list(required), "properties": props, "additionalProperties": False}


def _json(schema: dict[str, Any], description: str, **headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = {name: {"description": text, "required": True, "schema": _STR}
                               for name, text in headers.items()}
    return response


_RETRY = {"Retry-After": "whole seconds to wait before trying again"}


def _refusal(description: str, *codes: str, retry_after: bool = False, fields: bool = False) -> dict[str, Any]:
    """A refusal, ``{"error": code, "detail": text}``, with the codes this status can carry."""
    unknown = set(codes) - set(ERROR_CODES)
    assert not unknown, f"not an error code of the gateway: {unknown}"  # a typo here must not pass
    optional = {"fields": {"type": "array", "items": _object({"field": _STR, "reason": _STR})}} if fields else None
    schema = _object({"error": {"type": "string", "enum": list(codes)}, "detail": _STR}, optional)
    return _json(schema, description, **(_RETRY if retry_after else {}))


_THROTTLED = _refusal("Too many failed authentications from this address within "
                      "`runtime.gateway.auth_failures.window_s`; other addresses are unaffected.",
                      "too_many_failures", retry_after=True)
_NEEDS_ADMIN = _refusal("No bearer token, or not the admin token.", "unauthorized")
_BODY_REFUSALS = {
    "408": _refusal("The body did not arrive within `runtime.gateway.body_timeout_s`; the connection is closed.",
                    "request_timeout"),
    "413": _refusal("The body exceeds `runtime.gateway.max_body_bytes`.", "body_too_large"),
}

_WORKER = _object({"id": _STR, "state": {"type": "string", "enum": list(get_args(WorkerState))},
                   "agent_name": _STR, "ref": {"type": "string", "description": "pid or container id"}})
_POOL = _object({
    "pool": {"type": "string", "enum": ["running", "stopped"],
             "description": "`stopped`: a client at zero, whose pool starts on its next trigger"},
    **{k: {"type": "integer", "minimum": 0} for k in ("total", "starting", "idle", "leased", "draining", "min_idle",
                                                     "max_size", "target", "missed_total", "waiting")},
    "utilization": {"type": "number", "minimum": 0, "maximum": 1},
    "backoff_s": {"type": "number", "minimum": 0},
    "last_error": {"type": ["string", "null"], "description": "why the last worker start failed, until one succeeds"},
    "workers": {"type": "array", "items": _WORKER},
}, {"webhooks": _object({"pending": {"type": ["integer", "null"], "minimum": 0},
                         "delivered_total": {"type": "integer", "minimum": 0},
                         "failed_total": {"type": "integer", "minimum": 0},
                         "last_error": {"type": ["string", "null"]}})})
_SUMMARY = _object({k: {"type": "integer", "minimum": 0} for k in (
    "clients", "running_pools", "starting", "idle", "leased", "draining", "waiting", "missed_total")})
_SOURCE = _object({"kind": {"const": "supabase"}, "up": _BOOL,
                   "down_reason": {"type": ["string", "null"], "description": "while down: `unreachable: …`, "
                                   "`refused: …` (the key may not read the table) or `crashed: …` (a poll raised); "
                                   "the last good clients are served meanwhile"},
                   "last_read_s_ago": {"type": ["number", "null"]},
                   "bad_rows": {"type": "object", "additionalProperties": _STR}},
                  {"sessions": _object({"pending": {"type": ["integer", "null"], "minimum": 0},
                                        **{k: {"type": "integer", "minimum": 0} for k in (
                                            "shipped_total", "failures_total", "rejected_total")},
                                        "last_error": {"type": ["string", "null"]},
                                        "last_shipped_at": {"type": ["number", "null"]}})})
_CLIENT_ID = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,31}$", "description": "a client's `id`"}


def _trigger_body() -> dict[str, Any]:
    schema = TriggerBody.model_json_schema()
    schema["properties"]["user_email"]["pattern"] = "^[^@\\s]{1,64}@[^@\\s]{1,255}$"
    schema["properties"]["context"]["description"] = "a JSON object of at most 16 KiB, strings valid Unicode"
    schema["properties"]["room_name"]["description"] = "a `preview_` prefix marks a preview session"
    return schema


def _operations() -> dict[str, dict[str, dict[str, Any]]]:
    trigger = {
        "operationId": "trigger",
        "summary": "Start a session: lease a warm worker of this client and dispatch it to the room.",
        "description": "Answers 200 once the leased worker has accepted the job: an agent is in the room.",
        "security": [{"clientToken": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _trigger_body()}}},
        "responses": {
            "200": _json(_object({k: _STR for k in ("session_id", "dispatch_id", "room_name", "worker_id", "agent_name",
                                                    "livekit_url", "participant_identity", "participant_token")}),
                         "The agent is in the room; the end user joins `livekit_url` with `participant_token` "
                         "(10 minutes, that room only)."),
            "400": _refusal("Not UTF-8, not JSON, not an object, or nested deeper than 32 levels.", "malformed_json"),
            "401": _refusal("No bearer token, or not a client's token.", "unauthorized"),
            "403": _refusal("The token belongs to another client than `client_id`.", "forbidden"),
            "404": _refusal("No such client, or no such agent for this client.", "unknown_client", "unknown_agent"),
            **_BODY_REFUSALS,
            "422": _refusal("The body failed validation; `fields` says which.", "invalid_body", fields=True),
            "429": _THROTTLED,
            "502": _refusal("LiveKit refused the dispatch or did not answer; the lease went back.", "livekit_error"),
            "503": _refusal("No warm worker free or none took the session in time, the dispatcher is restarting, "
                            "or this runtime is draining (shutting down; another one takes over).",
                            "no_idle_worker", "restarting", "draining", retry_after=True),
            "504": _refusal("No answer within the dispatch deadline (not expected: every step is bounded).", "timeout"),
        },
    }
    stats = {
        "operationId": "poolStats",
        "summary": "One client's pool, or a page of clients in id order with totals over every running pool.",
        "description": "A removed client's still-draining pool is listed too. Only running pools are asked: "
                       "the answer costs what the active clients cost, however many are configured.",
        "security": [{"adminToken": []}],
        "parameters": [
            {"name": "client", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1,
             "maxLength": 64}, "description": "this client alone (no `summary`, no paging)"},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": STATS_MAX_LIMIT, "default": 100}},
            {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1,
             "maxLength": 64}, "description": "the `next_cursor` of the page before"},
        ],
        "responses": {
            "200": _json(_object({"clients": {"type": "object", "additionalProperties": _POOL}},
                                 {"next_cursor": {"type": ["string", "null"]}, "summary": _SUMMARY,
                                  "source": _SOURCE}),
                         "Pools by client id; `next_cursor` (null on the last page) and `summary` unless "
                         "`client` was given; `source` with a Supabase client source."),
            "400": _refusal("An unknown parameter, or a `limit` outside 1 to 1000.", "invalid_query"),
            "401": _NEEDS_ADMIN,
            "404": _refusal("No such client (with `client`).", "unknown_client"),
            "429": _THROTTLED,
        },
    }
    sessions, usage = _session_operations()
    reload = {
        "operationId": "reload",
        "summary": "Re-read the config file (or the client source) and apply it; the same as SIGHUP.",
        "security": [{"adminToken": []}],
        "responses": {
            "200": _json(_object({k: {"type": "array", "items": _STR} for k in ("added", "removed", "changed")}),
                         "Client ids added, removed and changed."),
            "401": _NEEDS_ADMIN,
            "422": _refusal("The file is invalid or changes the `runtime` section; nothing changed.", "config_error"),
            "429": _THROTTLED,
            "503": _refusal("This runtime is draining: nothing changed.", "draining", retry_after=True),
        },
    }
    shutdown = {
        "operationId": "shutdown",
        "summary": "Shut this runtime down: drain, as on SIGTERM; with `now=1`, end every session and stop at once.",
        "description": "A drain takes no new session, stops idle workers and lets live sessions finish, for up to "
                       "`runtime.shutdown.drain_timeout_s`; then `serve` exits 0. `now=1` (also during a drain) ends "
                       "every session, each agent saying `runtime.shutdown.end_message` first, and stops.",
        "security": [{"adminToken": []}],
        "parameters": [{"name": "now", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": ["0", "1"], "default": "0"}}],
        "responses": {
            "202": _json(_object({"shutdown": {"type": "string", "enum": ["draining", "now"]}}),
                         "The shutdown has begun."),
            "401": _NEEDS_ADMIN,
            "422": _refusal("`now` is not 0 or 1; nothing changed.", "invalid_body", fields=True),
            "429": _THROTTLED,
        },
    }
    webhook = {
        "operationId": "livekitWebhook",
        "summary": "A client's LiveKit project reports a room or participant event.",
        "description": "Believed only once LiveKit's signature checks out against that client's key pair; an unknown "
                       "client gets the same 401. A repeated event id is answered with `duplicate: true`, not counted "
                       "again. `room_finished` ends the session; the last end user's `participant_left` ends it "
                       "unless a user is back within `rejoin_grace_s`.",
        "security": [{"livekitSignature": []}],
        "parameters": [{"name": "client_id", "in": "path", "required": True, "schema": _CLIENT_ID}],
        "requestBody": {"required": True, "content": {"application/webhook+json": {
            "schema": {"type": "object", "description": "LiveKit's WebhookEvent as JSON"}}}},
        "responses": {
            "200": _json(_object({"received": _STR}, {"duplicate": {"const": True}}), "The verified event's name."),
            "400": _refusal("Signed, but the body is not a JSON object.", "malformed_json"),
            "401": _refusal("The signature does not verify with this client's key pair, or no such client.",
                            "invalid_signature"),
            "422": _refusal("Signed, but not a LiveKit WebhookEvent: no `event`, or a field of the wrong type.",
                            "invalid_body", fields=True),
            **_BODY_REFUSALS, "429": _THROTTLED,
        },
    }
    crash = {
        "operationId": "crashPool",
        "summary": "Fault injection for the supervision tests: crash this client's pool actor.",
        "description": "Exists only with `runtime.fault_injection: true`; otherwise every call is a 404 `not_found`.",
        "security": [{"adminToken": []}],
        "parameters": [{"name": "client_id", "in": "path", "required": True, "schema": _CLIENT_ID}],
        "responses": {
            "200": _json(_object({"crashed": _STR}), "The pool was told to crash; the supervisor restarts it."),
            "401": _NEEDS_ADMIN,
            "404": _refusal("Fault injection is off, or there is no such pool.", "not_found", "unknown_client"),
            "429": _THROTTLED,
        },
    }
    metrics = {
        "operationId": "metrics",
        "summary": "Prometheus metrics (they name every client).",
        "description": "Served here only while `runtime.metrics` is not set; with it, on that listener alone.",
        "security": [],
        "responses": {
            "200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": _STR}}},
            "404": _refusal("Metrics are served on their own listener (`runtime.metrics`).", "not_found"),
        },
    }
    healthz = {
        "operationId": "healthz",
        "summary": "Liveness: 200 while the supervisor runs.",
        "security": [],
        "responses": {
            "200": _json(_object({"status": {"const": "ok"}}), "The supervisor runs."),
            "503": _refusal("The supervisor gave up; the process is exiting.", "failed"),
        },
    }
    readyz = {
        "operationId": "readyz",
        "summary": "Readiness: every pool has `min_idle` idle workers, the backend is warm (the zygote booted), "
                   "and the runtime is not draining.",
        "description": "Anyone may ask; with the admin token the answer also names the clients still warming. A token "
                       "that is presented and wrong counts as a failed authentication.",
        "security": [{}, {"adminToken": []}],
        "responses": {
            "200": _json(_object({"status": {"const": "ready"}}), "Every pool is warm."),
            "429": _THROTTLED,
            "503": _json(_object({"status": {"type": "string", "enum": ["warming", "draining"]}},
                                 {"waiting_for": {"type": "array", "items": _STR,
                                                  "description": "admin only: the clients below `min_idle`; empty while "
                                                                 "only the zygote boots"}}),
                         "Some pool is below `min_idle`, the zygote is still booting, or the runtime is draining "
                         "(a status answer, not a refusal)."),
        },
    }
    document = {"operationId": "openapi", "summary": "This document.", "security": [],
                "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document of the gateway.")}}
    return {
        "/api/v1/trigger": {"post": trigger},
        "/api/v1/containers/pool/stats": {"get": stats},
        "/api/v1/sessions": {"get": sessions},
        "/api/v1/usage": {"get": usage},
        "/api/v1/admin/reload": {"post": reload},
        "/api/v1/admin/shutdown": {"post": shutdown},
        "/api/v1/webhooks/livekit/{client_id}": {"post": webhook},
        "/api/v1/admin/fault/crash-pool/{client_id}": {"post": crash},
        "/metrics": {"get": metrics},
        "/healthz": {"get": healthz},
        "/readyz": {"get": readyz},
        OPENAPI_PATH: {"get": document},
    }


_TIME = {"type": "string", "description": "Unix seconds, or an ISO 8601 time (UTC unless it names its offset)"}
_WHEN = {"type": ["string", "null"], "format": "date-time"}
_RECORD = _object({
    "id": _STR, "client": _STR,
    **{k: {"type": ["string", "null"]} for k in ("agent", "room", "worker_id", "backend", "livekit_url", "user_hash",
                                                 "error")},
    "status": {"type": ["integer", "null"], "description": "the trigger's answer; null: not answered yet"},
    "end_cause": {"type": ["string", "null"], "enum": [*get_args(EndCause), None]},
    **{k: _WHEN for k in ("received_at", "answered_at", "joined_at", "user_joined_at", "ended_at")},
    "seconds": {"type": ["number", "null"], "description": "from the agent joining to the end"},
})
_USAGE = _object({
    "sessions": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                 "description": "counts by end cause, and `open`, `pending` (not answered yet), `refused`, "
                                "`unknown` (ended without a cause)"},
    "session_seconds": {"type": "number", "minimum": 0},
    "idle_worker_seconds": {"type": "number", "minimum": 0, "description": "what the warm capacity cost"},
    "refused": {"type": "integer", "minimum": 0},
})
_READER: list[dict[str, list[str]]] = [{"adminToken": []}, {"clientToken": []}]
_SCOPE = ("The admin token reads every client's; a client's token reads only its own (another `client` is a "
          "403).")


def _session_operations() -> tuple[dict[str, Any], dict[str, Any]]:
    client = {"name": "client", "in": "query", "required": False,
              "schema": {"type": "string", "minLength": 1, "maxLength": 64}, "description": "this client's only"}
    common = {
        "401": _refusal("No bearer token, or neither the admin's nor a client's.", "unauthorized"),
        "403": _refusal("A client's token asked for another client's.", "forbidden"),
        "429": _THROTTLED,
        "404": _refusal("Records are off in this runtime (`runtime.sessions.record: false`).", "not_found"),
    }
    sessions = {
        "operationId": "sessions",
        "summary": "Session records, in the order their triggers came, a page at a time.",
        "description": _SCOPE + " Every trigger has one, refused ones included (with their status and error).",
        "security": _READER,
        "parameters": [
            client,
            {"name": "since", "in": "query", "required": False, "schema": _TIME},
            {"name": "until", "in": "query", "required": False, "schema": _TIME},
            {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1},
             "description": "the `next_cursor` of the page before"},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": SESSIONS_MAX_LIMIT, "default": 100}},
        ],
        "responses": {
            "200": _json(_object({"sessions": {"type": "array", "items": _RECORD},
                                  "next_cursor": {"type": ["string", "null"]}}),
                         "Records; `next_cursor` is null on the last page."),
            "400": _refusal("An unknown parameter, a bad time, cursor or limit.", "invalid_query"),
            **common,
        },
    }
    usage = {
        "operationId": "usage",
        "summary": "What each client used: sessions by outcome, session seconds, idle worker seconds, refusals.",
        "description": _SCOPE + " `from` defaults to the start of this month (UTC), `to` to now.",
        "security": _READER,
        "parameters": [client, {"name": "from", "in": "query", "required": False, "schema": _TIME},
                       {"name": "to", "in": "query", "required": False, "schema": _TIME}],
        "responses": {
            "200": _json(_object({"from": _STR, "to": _STR,
                                  "clients": {"type": "object", "additionalProperties": _USAGE}}),
                         "Usage by client id, for triggers received in [from, to)."),
            "400": _refusal("An unknown parameter or a bad time.", "invalid_query"),
            **common,
        },
    }
    return sessions, usage


_DESCRIPTION = """\
A warm-pool runtime for multi-tenant voice agents on LiveKit: a client's backend triggers a
session and gets an agent in a LiveKit room.

Every refusal is JSON `{"error": code, "detail": text}` and changes nothing. Besides the
answers listed per operation: an unknown path is a 404 `not_found`, a known path with another
method a 405 `method_not_allowed` (with `Allow`), and a bug a bare 500 `internal` whose body
says nothing of its cause. GET routes also answer HEAD. Failed authentications (a wrong or
missing token, a bad webhook signature) are counted per source address: past
`runtime.gateway.auth_failures.max` within `window_s`, that address gets 429 with
`Retry-After`, even with a right token."""


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once; it depends on code only, never on the config)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Autonomite gateway", "version": "1", "description": _DESCRIPTION},
        "paths": _operations(),
        "components": {"securitySchemes": {
            "clientToken": {"type": "http", "scheme": "bearer", "description": "The client's `api_token`."},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "`runtime.admin_token`."},
            "livekitSignature": {"type": "apiKey", "in": "header", "name": "Authorization",
                                 "description": "LiveKit's signed JWT (no `Bearer`), whose `sha256` claim is the "
                                                "body's hash, signed with the client's LiveKit API key and secret."},
        }},
    }


@functools.cache
def rendered() -> str:
    """The document as ``docs/openapi.json`` holds it; made once (it is served to anyone)."""
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


async def serve_openapi(request: web.Request) -> web.Response:
    return web.Response(text=rendered(), content_type="application/json")


if __name__ == "__main__":
    sys.stdout.write(rendered())
