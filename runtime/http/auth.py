"""Who is asking: the admin, a client (by its token), or nobody, and the per-address limit
on failed authentications that every authenticated route shares.

A failed authentication counts against the TCP peer; past the limit the address gets 429
before its token is even looked at, so guessing tokens costs the guesser, not the runtime.
"""

from __future__ import annotations

from aiohttp import web

from runtime.http.errors import Refusal
from runtime.http.guard import AuthFailureLimiter, bearer_token, retry_after_header
from runtime.http.models import ErrorCode
from runtime.http.service import RUNTIME
from runtime.secrets import same_secret

AUTH_FAILURES = web.AppKey("auth_failures", AuthFailureLimiter)


def peer(request: web.Request) -> str:
    """The TCP peer. Behind a proxy that is the proxy: X-Forwarded-For is anyone's to forge."""
    return request.remote or "unknown"


def refuse_if_blocked(request: web.Request) -> None:
    """429 for an address with too many recent failures, before its token is even looked at."""
    wait = request.app[AUTH_FAILURES].retry_after(peer(request))
    if wait:
        raise Refusal(429, "too_many_failures", "too many failed authentications from this address",
                      {"Retry-After": retry_after_header(wait)})


def auth_failed(request: web.Request, code: ErrorCode, detail: str) -> Refusal:
    request.app[AUTH_FAILURES].failed(peer(request))
    return Refusal(401, code, detail)


def bearer(request: web.Request) -> str | None:
    return bearer_token(request.headers.get("Authorization", ""))


def is_admin(request: web.Request) -> bool:
    token = bearer(request)
    expected = request.app[RUNTIME].settings.runtime.admin_token.get_secret_value()
    return token is not None and same_secret(token, expected)


def require_admin(request: web.Request) -> None:
    refuse_if_blocked(request)
    if not is_admin(request):
        raise auth_failed(request, "unauthorized", "the admin token is required")
