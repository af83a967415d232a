"""The HTTP gateway (aiohttp): triggers in, stats and metrics out.

It never blocks its event loop: actors are reached through ``runtime.bridge`` and file or
supervisor work (reload) runs in an executor. Every refusal is a JSON body with a
machine-readable ``error`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from actors import pool_id
from actors.messages import Crash, GetStats, PoolStats, Trigger, TriggerRequest, TriggerResult
from runtime import bridge
from runtime.app import Runtime
from runtime.livekit import verify_webhook
from runtime.secrets import same_secret
from runtime.settings import ConfigError

logger = logging.getLogger("autonomite.gateway")

RUNTIME = web.AppKey("runtime", Runtime)
MAX_BODY = web.AppKey("max_body", int)
ACTOR_TIMEOUT_S = 10.0
MAX_CONTEXT_BYTES = 16 * 1024
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")


class TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(min_length=1, max_length=64)
    agent: str = Field(min_length=1, max_length=64)
    room_name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    user_email: str | None = Field(None, max_length=320)
    context: dict | None = None
    conversation_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")

    @field_validator("user_email")
    @classmethod
    def _email_shape(cls, v: str | None) -> str | None:
        if v is not None and not _EMAIL.match(v):
            raise ValueError("not an email address")
        return v

    @field_validator("context")
    @classmethod
    def _context_bounded(cls, v: dict | None) -> dict | None:
        if v is not None and len(json.dumps(v)) > MAX_CONTEXT_BYTES:
            raise ValueError(f"larger than {MAX_CONTEXT_BYTES} bytes as JSON")
        return v


def error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers or None)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _is_admin(request: web.Request) -> bool:
    token = _bearer(request)
    expected = request.app[RUNTIME].settings.runtime.admin_token.get_secret_value()
    return token is not None and same_secret(token, expected)


# -- triggers --------------------------------------------------------------------------------


async def trigger(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    token = _bearer(request)
    caller = runtime.client_by_token(token) if token else None
    if caller is None:
        return error(401, "unauthorized", "a valid client bearer token is required")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error(413, "body_too_large", f"the body exceeds {request.app[MAX_BODY]} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return error(400, "malformed_json", "the body is not valid JSON")
    if not isinstance(data, dict):
        return error(400, "malformed_json", "the body must be a JSON object")
    try:
        body = TriggerBody.model_validate(data)
    except ValidationError as e:
        fields = [{"field": ".".join(str(p) for p in err["loc"]), "reason": err["msg"]} for err in e.errors()]
        return web.json_response({"error": "invalid_body", "detail": "the body failed validation", "fields": fields}, status=422)
    if body.client_id != caller.id:
        if runtime.settings.client(body.client_id) is None:
            return error(404, "unknown_client", f"no client {body.client_id!r}")
        return error(403, "forbidden", "this token belongs to another client")
    if caller.agent(body.agent) is None:
        return error(404, "unknown_agent", f"client {caller.id!r} has no agent {body.agent!r}")
    dispatch = runtime.directory.get("dispatch")
    if dispatch is None:
        return error(503, "restarting", "the dispatcher is restarting", **{"Retry-After": "1"})
    req = TriggerRequest(
        body.client_id, body.agent, body.room_name, body.user_email, body.context, body.conversation_id
    )
    try:
        result: TriggerResult = await bridge.ask(lambda reply: dispatch.tell(Trigger(req, caller, reply)), ACTOR_TIMEOUT_S)
    except asyncio.TimeoutError:
        return error(504, "timeout", "the dispatch did not complete in time")
    headers = {"Retry-After": str(result.retry_after_s)} if result.retry_after_s else None
    return web.json_response(result.body, status=result.status, headers=headers)


# -- stats, health, metrics ------------------------------------------------------------------


async def pool_stats(runtime: Runtime) -> dict[str, PoolStats]:
    pools = runtime.directory.with_prefix(pool_id(""))

    async def one(ref) -> PoolStats | None:  # noqa: ANN001
        try:
            return await bridge.ask(lambda reply: ref.tell(GetStats(reply)), 2.0)
        except Exception:  # noqa: BLE001 - a restarting pool is left out of this answer
            return None

    answers = await asyncio.gather(*(one(ref) for ref in pools.values()))
    return {cid: s for cid, s in zip(pools, answers, strict=True) if s is not None}


async def stats(request: web.Request) -> web.Response:
    if not _is_admin(request):
        return error(401, "unauthorized", "the admin token is required")
    all_stats = await pool_stats(request.app[RUNTIME])
    return web.json_response({"clients": {cid: s.as_json() for cid, s in sorted(all_stats.items())}})


async def healthz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.failed.is_set():
        return error(503, "failed", "the supervisor gave up")
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    all_stats = await pool_stats(runtime)
    waiting = sorted(
        c.id for c in runtime.settings.clients if c.id not in all_stats or all_stats[c.id].idle < c.pool.min_idle
    )
    if waiting:
        return web.json_response({"status": "warming", "waiting_for": waiting}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[RUNTIME].metrics
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


# -- LiveKit webhooks ---------------------------------------------------------------------


async def livekit_webhook(request: web.Request) -> web.Response:
    """A client's LiveKit project reports room and participant events.

    Nothing is believed before the signature checks out against that client's own key pair
    (the header carries LiveKit's JWT, whose sha256 claim covers the body). Verified events
    are counted per client and event: the per-client usage record that billing starts from.
    """
    runtime = request.app[RUNTIME]
    client = runtime.settings.client(request.match_info["client_id"])
    if client is None:
        return error(404, "unknown_client", "no such client")
    try:
        body = (await request.read()).decode("utf-8")
        event = verify_webhook(client.livekit, body, request.headers.get("Authorization", ""))
    except web.HTTPRequestEntityTooLarge:
        return error(413, "body_too_large", "the body is too large")
    except Exception:  # noqa: BLE001 - any failure to verify is the same answer, and says nothing more
        logger.warning("rejected a LiveKit webhook for %s: signature did not verify", client.id)
        return error(401, "invalid_signature", "the webhook is not signed with this client's key")
    runtime.metrics.webhooks.labels(client.id, event.event or "unknown").inc()
    logger.info("livekit %s: %s in room %s", client.id, event.event, event.room.name or "-")
    return web.json_response({"received": event.event})


# -- admin -----------------------------------------------------------------------------------


async def reload(request: web.Request) -> web.Response:
    if not _is_admin(request):
        return error(401, "unauthorized", "the admin token is required")
    runtime = request.app[RUNTIME]
    try:
        summary = await asyncio.get_running_loop().run_in_executor(None, runtime.reload)
    except ConfigError as e:
        logger.error("reload refused: %s", e)
        return error(422, "config_error", str(e))
    return web.json_response(summary.as_json())


async def crash_pool(request: web.Request) -> web.Response:
    """Fault injection, for the supervision tests; absent unless the config turns it on."""
    runtime = request.app[RUNTIME]
    if not runtime.settings.runtime.fault_injection:
        raise web.HTTPNotFound()
    if not _is_admin(request):
        return error(401, "unauthorized", "the admin token is required")
    ref = runtime.directory.get(pool_id(request.match_info["client_id"]))
    if ref is None:
        return error(404, "unknown_client", "no such pool")
    ref.tell(Crash())
    return web.json_response({"crashed": request.match_info["client_id"]})


def create_app(runtime: Runtime) -> web.Application:
    max_body = runtime.settings.runtime.gateway.max_body_bytes
    app = web.Application(client_max_size=max_body)
    app[RUNTIME] = runtime
    app[MAX_BODY] = max_body
    app.router.add_post("/api/v1/trigger", trigger)
    app.router.add_get("/api/v1/containers/pool/stats", stats)
    app.router.add_post("/api/v1/admin/reload", reload)
    app.router.add_post("/api/v1/webhooks/livekit/{client_id}", livekit_webhook)
    app.router.add_post("/api/v1/admin/fault/crash-pool/{client_id}", crash_pool)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
