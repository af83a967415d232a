"""The HTTP gateway (aiohttp): triggers in, stats and metrics out.

It never blocks its event loop: actors are reached through ``runtime.http.bridge`` and file or
supervisor work (reload) runs in an executor. Every refusal is a JSON body
``{"error": code, "detail": text}`` and changes nothing: handlers raise ``Refusal``, and
the ``json_errors`` middleware answers it, turns aiohttp's own errors (404, 405, ...) into
the same shape, and hides unexpected exceptions behind a bare 500.

Hostile input is held off here, with the pure helpers of ``runtime.http.guard``: bearer
tokens must be printable ASCII, trigger bodies are bounded in size, time, nesting depth and
Unicode validity, failed authentications are rate-limited per source address, and a
connection that dawdles over its request head is closed (see ``create_runner``).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pykka
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from actors import pool_id
from actors.messages import Crash, GetStats, PoolStats, Trigger, TriggerRequest, TriggerResult
from runtime.http import bridge
from runtime.http.auth import AUTH_FAILURES, auth_failed, bearer, is_admin, peer, refuse_if_blocked, require_admin
from runtime.http.errors import Refusal, error, json_errors
from runtime.http.guard import (
    MAX_JSON_DEPTH,
    AuthFailureLimiter,
    RecentIds,
    is_json_object,
    nested_deeper_than,
)
from runtime.http.metrics_listener import metrics
from runtime.http.models import ErrorCode, TriggerBody, parse_stats_query, summarize
from runtime.http.openapi import OPENAPI_PATH, serve_openapi
from runtime.http.service import RUNTIME, Service
from runtime.http.sessions import sessions, usage
from runtime.livekit.client import LIVEKIT_EVENTS, InvalidEvent, parse_webhook, verify_webhook
from runtime.sessions.log import user_hash
from runtime.settings import ConfigError, LiveKitSettings

logger = logging.getLogger("autonomite.gateway")


@dataclass
class Lifecycle:
    """The gateway's side of a shutdown (``runtime/server/serve.py`` owns the other): whether this
    runtime drains, and where a shutdown asked for over HTTP goes. Touched on the loop only."""

    draining: bool = False
    request: Callable[[str], None] = field(default=lambda cause: None)  # "admin" or "admin_now"


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
MAX_BODY = web.AppKey("max_body", int)
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)
WEBHOOK_IDS = web.AppKey("webhook_ids", RecentIds)

# Webhooks for an unknown client are checked against this key pair, which nobody holds, so
# they fail exactly as a bad signature for a known client does, in about the same time.
_NOBODY = LiveKitSettings(url="ws://unknown.invalid", api_key="unknown-client", api_secret=secrets.token_urlsafe(32))


DRAINING_RETRY_AFTER_S = 1  # another runtime is, or soon will be, on this address


def _draining(request: web.Request) -> Refusal:
    return Refusal(503, "draining", "this runtime is shutting down and takes no new sessions; retry, another "
                   "runtime takes over", {"Retry-After": str(DRAINING_RETRY_AFTER_S)})


@web.middleware
async def close_while_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While draining, no connection is kept alive: a caller's next request opens a new one,
    which reaches the runtime that takes over once this one stops listening."""
    response = await handler(request)
    if request.app[LIFECYCLE].draining:
        response.force_close()
    return response


# -- bodies ----------------------------------------------------------------------------------


async def _read_body(request: web.Request) -> bytes:
    """The whole body, or 413 past the size limit, or 408 if it arrives too slowly."""
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT_S]):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Refusal(413, "body_too_large", f"the body exceeds {request.app[MAX_BODY]} bytes") from None
    except TimeoutError:
        raise Refusal(408, "request_timeout", f"the body did not arrive within {request.app[BODY_TIMEOUT_S]} s",
                      close=True) from None


# -- triggers --------------------------------------------------------------------------------


def parse_trigger(raw: bytes) -> TriggerBody:
    """The validated trigger body, or a 400/422 Refusal saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "malformed_json", "the body is not UTF-8") from None
    if nested_deeper_than(text, MAX_JSON_DEPTH):  # before json.loads, which would recurse
        raise Refusal(400, "malformed_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise Refusal(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refusal(400, "malformed_json", "the body must be a JSON object")
    try:
        return TriggerBody.model_validate(data)
    except ValidationError as e:
        fields = [{"field": ".".join(str(p) for p in err["loc"]), "reason": err["msg"]} for err in e.errors()]
        raise Refusal(422, "invalid_body", "the body failed validation", extra={"fields": fields}) from None


async def trigger(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    refuse_if_blocked(request)
    token = bearer(request)
    caller = runtime.client_by_token(token) if token else None
    if caller is None:
        raise auth_failed(request, "unauthorized", "a valid client bearer token is required")
    body = parse_trigger(await _read_body(request))
    if body.client_id != caller.id:
        if runtime.settings.client(body.client_id) is None:
            return error(404, "unknown_client", f"no client {body.client_id!r}")
        return error(403, "forbidden", "this token belongs to another client")
    session_id, received_at = os.urandom(16).hex(), time.time()  # from here on, the trigger has a record

    def refused(status: int, code: ErrorCode) -> None:
        if runtime.sessions is not None:
            runtime.sessions.refused(session_id, caller.id, body.agent, body.room_name, user_hash(body.user_email),
                                     received_at, status, code)

    if caller.agent(body.agent) is None:
        refused(404, "unknown_agent")
        return error(404, "unknown_agent", f"client {caller.id!r} has no agent {body.agent!r}")
    if request.app[LIFECYCLE].draining:
        refused(503, "draining")
        raise _draining(request)
    dispatch = runtime.directory.get("dispatch")
    if dispatch is None:
        refused(503, "restarting")
        return error(503, "restarting", "the dispatcher is restarting", **{"Retry-After": "1"})
    req = TriggerRequest(
        body.client_id, body.agent, body.room_name, body.user_email, body.context, body.conversation_id
    )
    deadline_s = runtime.settings.runtime.dispatch.deadline_s  # the dispatcher answers by then
    try:
        result: TriggerResult = await bridge.ask(
            lambda reply: dispatch.tell(Trigger(req, caller, reply, session_id, received_at)), deadline_s)
    except pykka.ActorDeadError:  # it died between the look-up and the tell
        refused(503, "restarting")
        return error(503, "restarting", "the dispatcher is restarting", **{"Retry-After": "1"})
    except TimeoutError:
        return error(504, "timeout", "the dispatch did not complete in time")
    headers = {"Retry-After": str(result.retry_after_s)} if result.retry_after_s else None
    return web.json_response(result.body, status=result.status, headers=headers)


# -- stats, health, metrics ------------------------------------------------------------------


async def pool_stats(runtime: Service) -> dict[str, PoolStats]:
    """Every pool's stats, a removed client's still-draining pool included."""
    pools = runtime.directory.with_prefix(pool_id(""), draining=True)

    answers = await asyncio.gather(*(_ask_stats(ref) for ref in pools.values()))
    return {cid: s for cid, s in zip(pools, answers, strict=True) if s is not None}


async def stats(request: web.Request) -> web.Response:
    """One client's pool (``?client=``), or a page of clients in id order (``?limit=`` up to
    1,000, ``?cursor=`` from the last page's ``next_cursor``) with totals over every pool.
    Only running pools are asked (a client at zero has none): the answer costs what the
    active clients cost, however many are configured."""
    require_admin(request)
    runtime = request.app[RUNTIME]
    try:
        query = parse_stats_query(request.query)
    except ValueError as e:
        raise Refusal(400, "invalid_query", str(e)) from None
    if query.client is not None:
        client = runtime.settings.client(query.client)
        ref = runtime.directory.get(pool_id(query.client), draining=True)  # a removed client's pool drains
        one = await _ask_stats(ref) if ref is not None else None
        if one is None and client is not None:
            one = PoolStats.stopped(client.id, client.pool.min_idle, client.pool.max_size)
        if one is None:
            raise Refusal(404, "unknown_client", f"no client {query.client!r}")
        return web.json_response({"clients": await _with_webhooks(runtime, {query.client: one.as_json()})})
    running = await pool_stats(runtime)
    ids = sorted({c.id for c in runtime.settings.clients} | running.keys())  # a removed client's pool drains
    start = bisect.bisect_right(ids, query.cursor) if query.cursor is not None else 0
    page = ids[start:start + query.limit]
    clients = {}
    for cid in page:
        client = runtime.settings.client(cid)
        stopped = PoolStats.stopped(cid, client.pool.min_idle, client.pool.max_size) if client else None
        found = running.get(cid) or stopped
        if found is not None:
            clients[cid] = found.as_json()
    body: dict[str, Any] = {
        "clients": await _with_webhooks(runtime, clients),
        "next_cursor": page[-1] if start + query.limit < len(ids) else None,
        "summary": summarize(len(runtime.settings.clients), running.values()),
    }
    if runtime.source is not None:
        body["source"] = runtime.source.status()
        if runtime.shipper is not None:  # the session records on their way to Supabase (counts SQLite rows)
            body["source"]["sessions"] = await asyncio.get_running_loop().run_in_executor(None, runtime.shipper.status)
    return web.json_response(body)


async def _with_webhooks(runtime: Service, clients: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each client with a webhook also shows how its session events are delivered (counted
    in SQLite: read off the loop)."""
    found = await asyncio.get_running_loop().run_in_executor(None, runtime.webhook_stats, list(clients))
    for cid, delivery in found.items():
        clients[cid]["webhooks"] = delivery
    return clients


async def _ask_stats(ref: pykka.ActorRef[Any]) -> PoolStats | None:
    try:
        stats: PoolStats = await bridge.ask(lambda reply: ref.tell(GetStats(reply)), 2.0)
    except Exception:  # noqa: BLE001 - a restarting pool is left out of this answer
        return None
    return stats


async def healthz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.failed.is_set() or not runtime.supervisor.is_alive():
        return error(503, "failed", "the supervisor gave up")
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready or warming, for anyone; which clients are still warming, for the admin only.

    Client ids are tenant names: an anonymous probe must not learn them. A token that is
    presented and wrong counts as a failed authentication, like everywhere else.
    """
    admin = False
    if "Authorization" in request.headers:
        refuse_if_blocked(request)
        admin = is_admin(request)
        if not admin:
            request.app[AUTH_FAILURES].failed(peer(request))
    if request.app[LIFECYCLE].draining:
        return web.json_response({"status": "draining"}, status=503)
    waiting = await warming(request.app[RUNTIME])
    if waiting is None:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "warming", **({"waiting_for": waiting} if admin else {})}, status=503)


async def warming(runtime: Service) -> list[str] | None:
    """The clients whose pool is below ``min_idle`` idle workers, or None if there are none
    and the runtime is ready. A client at zero is never warming: it has nothing to warm, but
    its first trigger needs a warm backend (the zygote booted), so the runtime waits for that
    too, with an empty list."""
    all_stats = await pool_stats(runtime)
    cold = sorted(
        c.id for c in runtime.settings.clients
        if c.pool.min_idle > 0 and (c.id not in all_stats or all_stats[c.id].idle < c.pool.min_idle)
    )
    return cold if cold or not runtime.backend.warm() else None


# -- LiveKit webhooks ---------------------------------------------------------------------


async def livekit_webhook(request: web.Request) -> web.Response:
    """A client's LiveKit project reports room and participant events.

    Nothing is believed before the signature checks out against that client's own key pair
    (the header carries LiveKit's JWT, whose sha256 claim covers the body); an unknown
    client gets the very same 401, so the endpoint does not tell which clients exist.
    LiveKit retries deliveries and a signed request can be replayed while its token lives,
    so each event id is taken once per client: a repeat is answered, not counted again.
    Verified events are counted per client and event: the usage record billing starts from.
    """
    runtime = request.app[RUNTIME]
    refuse_if_blocked(request)
    client = runtime.settings.client(request.match_info["client_id"])
    raw = await _read_body(request)
    try:
        body = raw.decode("utf-8")
        verify_webhook((client.livekit if client else _NOBODY), body, request.headers.get("Authorization", ""))
        if client is None:
            raise ValueError("no such client")  # unreachable: nobody holds _NOBODY's secret
    except Exception:  # noqa: BLE001 - any failure to verify is the same answer, and says nothing more
        logger.warning("rejected a LiveKit webhook for %r: signature did not verify", request.match_info["client_id"])
        raise auth_failed(request, "invalid_signature", "the webhook is not signed with this client's key") from None
    if not is_json_object(raw):  # signed, but no event: counted nowhere (found by tests/integration/test_fuzz.py)
        raise Refusal(400, "malformed_json", "the webhook body must be a JSON object (a LiveKit WebhookEvent)")
    try:
        event = parse_webhook(body)
    except InvalidEvent as e:  # signed by the client's key, yet not an event: counted nowhere
        raise Refusal(422, "invalid_body", "the webhook body is not a LiveKit WebhookEvent",
                      extra={"fields": [{"field": e.field, "reason": e.reason}]}) from None
    seen = request.app[WEBHOOK_IDS]
    if event.id and (client.id, event.id) in seen:
        logger.info("livekit %s: duplicate event %s ignored", client.id, event.id)
        return web.json_response({"received": event.event, "duplicate": True})
    runtime.on_livekit_event(client.id, event)  # only tells an actor: cheap, never blocks the loop
    if event.id:  # after the hook: had it failed, LiveKit's retry would be taken afresh
        seen.add(client.id, event.id)
    runtime.metrics.webhooks.labels(client.id, event.event if event.event in LIVEKIT_EVENTS else "other").inc()
    logger.info("livekit %s: %r in room %r", client.id, event.event, event.room.name or "-")
    return web.json_response({"received": event.event})


# -- admin -----------------------------------------------------------------------------------


async def reload(request: web.Request) -> web.Response:
    require_admin(request)
    if request.app[LIFECYCLE].draining:
        raise _draining(request)
    runtime = request.app[RUNTIME]
    try:
        summary = await asyncio.get_running_loop().run_in_executor(None, runtime.reload)
    except ConfigError as e:
        logger.error("reload refused: %s", e)
        return error(422, "config_error", str(e))
    return web.json_response(summary.as_json())


async def shutdown(request: web.Request) -> web.Response:
    """Drain, as on SIGTERM; with ``now=1``, end every session and stop at once."""
    require_admin(request)
    now = request.query.get("now", "0")
    if now not in ("0", "1"):
        raise Refusal(422, "invalid_body", "the query failed validation",
                      extra={"fields": [{"field": "now", "reason": "must be 0 or 1"}]})
    request.app[LIFECYCLE].request("admin_now" if now == "1" else "admin")
    return web.json_response({"shutdown": "now" if now == "1" else "draining"}, status=202)


async def crash_pool(request: web.Request) -> web.Response:
    """Fault injection, for the supervision tests; absent unless the config turns it on."""
    runtime = request.app[RUNTIME]
    if not runtime.settings.runtime.fault_injection:
        raise web.HTTPNotFound()
    require_admin(request)
    ref = runtime.directory.get(pool_id(request.match_info["client_id"]))
    if ref is None:
        return error(404, "unknown_client", "no such pool")
    ref.tell(Crash())
    return web.json_response({"crashed": request.match_info["client_id"]})


@dataclass(frozen=True)
class Route:
    method: Literal["GET", "POST"]  # a GET route answers HEAD too
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]


# The whole API, in one table (docs/openapi.json describes each; tests/unit/test_openapi.py
# checks that the two agree).
ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/trigger", trigger),
    Route("GET", "/api/v1/containers/pool/stats", stats),
    Route("GET", "/api/v1/sessions", sessions),
    Route("GET", "/api/v1/usage", usage),
    Route("POST", "/api/v1/admin/reload", reload),
    Route("POST", "/api/v1/admin/shutdown", shutdown),
    Route("POST", "/api/v1/webhooks/livekit/{client_id}", livekit_webhook),
    Route("POST", "/api/v1/admin/fault/crash-pool/{client_id}", crash_pool),
    Route("GET", "/metrics", metrics),  # not here when runtime.metrics gives it a listener of its own
    Route("GET", "/healthz", healthz),
    Route("GET", "/readyz", readyz),
    Route("GET", OPENAPI_PATH, serve_openapi),
)


def create_app(runtime: Service) -> web.Application:
    gw = runtime.settings.runtime.gateway
    app = web.Application(client_max_size=gw.max_body_bytes, middlewares=[close_while_draining, json_errors])
    app[RUNTIME] = runtime
    app[LIFECYCLE] = Lifecycle()
    app[MAX_BODY] = gw.max_body_bytes
    app[BODY_TIMEOUT_S] = gw.body_timeout_s
    app[AUTH_FAILURES] = AuthFailureLimiter(gw.auth_failures.max, gw.auth_failures.window_s)
    app[WEBHOOK_IDS] = RecentIds(per_key=10_000)
    for route in ROUTES:
        if route.handler is metrics and runtime.settings.runtime.metrics is not None:
            continue  # on its own listener only (runtime/http/metrics_listener.py)
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_post(route.path, route.handler)
    return app


def create_runner(runtime: Service) -> web.AppRunner:
    """The gateway's runner, with its connection timeouts; the caller sets it up and adds a site.

    The header timeout is aiohttp's ``keepalive_timeout``: aiohttp (3.14) starts that timer
    when a connection opens and again after each response, and when it fires closes the
    connection if it is still waiting for a complete request head. Bytes trickling in do
    not postpone it, so a slowloris client is cut off after ``header_timeout_s``, and so is
    an idle keep-alive connection. ``tests/unit/test_http_guard.py`` pins that behaviour.
    """
    gw = runtime.settings.runtime.gateway
    return web.AppRunner(create_app(runtime), access_log=None, keepalive_timeout=gw.header_timeout_s)
