"""Session records over HTTP: ``GET /api/v1/sessions`` (a client's history, in pages) and
``GET /api/v1/usage`` (what it used, to bill from).

The admin token reads every client's; a client's own token reads only its own, and asking
for another client's is a 403 (not a 404: which clients exist is not a client's to learn,
but a token that reads nothing must say so). The store is SQLite on disk: reads run in the
default executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from aiohttp import web

from runtime.http.auth import auth_failed, bearer, is_admin, refuse_if_blocked
from runtime.http.errors import Refusal
from runtime.http.models import encode_cursor, parse_sessions_query, parse_usage_query
from runtime.http.service import RUNTIME
from runtime.sessions.store import SqliteStore, empty_usage


def _caller(request: web.Request) -> str | None:
    """Who asks, before anything else is looked at: None for the admin, else the client's id."""
    refuse_if_blocked(request)
    if is_admin(request):
        return None
    token = bearer(request)
    caller = request.app[RUNTIME].client_by_token(token) if token else None
    if caller is None:
        raise auth_failed(request, "unauthorized", "the admin token or a client's token is required")
    return caller.id


def _scope(caller: str | None, asked: str | None) -> str | None:
    """Whose records this caller may read: None (every client's) for the admin."""
    if caller is None:
        return asked
    if asked is not None and asked != caller:
        raise Refusal(403, "forbidden", "this token reads only its own client's sessions")
    return caller


def _store(request: web.Request) -> SqliteStore:
    sessions = request.app[RUNTIME].sessions
    if sessions is None:
        raise Refusal(404, "not_found", "session records are off in this runtime (runtime.sessions.record: false)")
    return sessions.store


async def sessions(request: web.Request) -> web.Response:
    caller = _caller(request)
    try:
        query = parse_sessions_query(request.query)
    except ValueError as e:
        raise Refusal(400, "invalid_query", str(e)) from None
    client = _scope(caller, query.client)
    store = _store(request)
    page = await asyncio.get_running_loop().run_in_executor(
        None, lambda: store.page(client, query.since, query.until, query.after, query.limit))
    last = page[-1] if len(page) == query.limit else None
    return web.json_response({
        "sessions": [r.as_json() for r in page],
        "next_cursor": encode_cursor(last.received_at or 0.0, last.id) if last else None,
    })


async def usage(request: web.Request) -> web.Response:
    caller = _caller(request)
    try:
        query = parse_usage_query(request.query, time.time())
    except ValueError as e:
        raise Refusal(400, "invalid_query", str(e)) from None
    client = _scope(caller, query.client)
    store = _store(request)
    found = await asyncio.get_running_loop().run_in_executor(None, store.usage, client, query.since, query.until)
    if client is not None:
        found.setdefault(client, empty_usage())
    return web.json_response({"from": _iso(query.since), "to": _iso(query.until), "clients": found})


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")
