"""``/metrics`` on a listener of its own, when ``runtime.metrics`` is set.

The metrics name every client (tenant) in their labels, so an operator whose gateway faces
the internet can keep them off it: with ``runtime.metrics: {host, port}`` the gateway stops
serving ``/metrics`` (a 404 like any unknown path) and this second aiohttp app serves it, in
the same event loop, on an address only the scraper reaches. Without the setting nothing
changes: ``/metrics`` stays on the gateway, as it always was.
"""

from __future__ import annotations

from aiohttp import web

from runtime.http.errors import json_errors
from runtime.http.service import RUNTIME, Service


async def metrics(request: web.Request) -> web.Response:
    m = request.app[RUNTIME].metrics
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


def create_metrics_runner(runtime: Service) -> web.AppRunner:
    """The metrics listener's runner (the caller sets it up and adds a site); refusals, such
    as a 404 for any other path, have the gateway's JSON shape."""
    app = web.Application(middlewares=[json_errors])
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics)
    header_timeout_s = runtime.settings.runtime.gateway.header_timeout_s  # the same slowloris bound
    return web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout_s)
