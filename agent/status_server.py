"""A worker's status port: the runtime's window into it (``agent/contract.py`` names what
it says), on loopback unless the runtime says otherwise (a worker on another node), and
only for callers with this worker's token. Runs on the worker's main event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from aiohttp import web

from agent.lease_book import LeaseBook


async def serve_status(state: LeaseBook) -> web.AppRunner:

    async def status(request: web.Request) -> web.Response:
        """With ``since=<etag>&wait=S``, a long poll: answers when the status is no longer
        ``since``, or after S seconds. The runtime follows each worker this way, so a
        change reaches it at once while an unchanged worker costs one request per S."""
        since = request.query.get("since")
        if since:
            try:
                wait = min(max(float(request.query.get("wait", "0") or 0), 0.0), 30.0)
            except ValueError:
                return web.json_response(state.as_json(), status=400)
            await state.changed_from(since, wait)
        return web.json_response(state.as_json())

    async def claim(request: web.Request) -> web.Response:
        ok = state.claim(request.query.get("lease_id", ""), request.query.get("worker_id", ""))
        return web.json_response(state.as_json(), status=200 if ok else 409)

    async def release(request: web.Request) -> web.Response:
        ok = state.release(request.query.get("lease_id", ""))
        return web.json_response(state.as_json(), status=200 if ok else 409)

    async def job(request: web.Request) -> web.Response:
        """Long poll: answers as soon as this lease's job is accepted, or at ``wait``."""
        try:
            wait = min(max(float(request.query.get("wait", "0") or 0), 0.0), 60.0)
        except ValueError:
            return web.json_response(state.as_json(), status=400)
        try:
            await asyncio.wait_for(state.job_accepted.wait(), wait)
        except TimeoutError:
            pass
        ok = (state.job_accepted.is_set() and not state.assignment_failed
              and state.lease_id == request.query.get("lease_id"))
        return web.json_response(state.as_json(), status=200 if ok else 409)

    async def end(request: web.Request) -> web.Response:
        """The room ended (a LiveKit webhook), or the runtime is shutting down: end the
        session now. With ``say=1`` the agent says ``reason`` to the caller first."""
        if state.end_session is None:
            return web.json_response(state.as_json(), status=409)
        try:
            say = request.query.get("say") == "1"
            state.end_session(request.query.get("reason", "ended by the runtime")[:500 if say else 100],
                              request.query.get("if_no_users") == "1", say)
        except RuntimeError:  # the job's loop is closed: the session is over already
            return web.json_response(state.as_json(), status=409)
        return web.json_response(state.as_json())

    @web.middleware
    async def authenticated(request: web.Request, handler):  # noqa: ANN001, ANN202
        token = state.config.status_token
        given = request.headers.get("Authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "unauthorized", "detail": "a valid worker token is required"}, status=401)
        state.heard_at = time.monotonic()
        return await handler(request)

    app = web.Application(middlewares=[authenticated])
    app.router.add_get("/status", status)
    app.router.add_post("/claim", claim)
    app.router.add_post("/release", release)
    app.router.add_get("/job", job)
    app.router.add_post("/end", end)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, state.config.status_host, state.config.status_port).start()
    return runner
