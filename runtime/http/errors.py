"""Every refusal the HTTP layer gives has one shape: JSON ``{"error": code, "detail": text}``.

Handlers raise :class:`Refusal`; the ``json_errors`` middleware answers it, turns aiohttp's
own errors (404, 405, ...) into the same shape, and hides unexpected exceptions behind a
bare 500 whose body says nothing of their cause. The gateway and the metrics listener both
use it.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from runtime.http.models import ErrorCode

logger = logging.getLogger("autonomite.gateway")

_HTTP_ERROR_CODES: dict[int, ErrorCode] = {
    404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "body_too_large",
}


class Refusal(Exception):
    """Raised by a handler or helper; the middleware answers with this JSON refusal."""

    def __init__(self, status: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None, close: bool = False) -> None:
        super().__init__(code)
        self.status, self.code, self.detail = status, code, detail
        self.headers, self.extra, self.close = headers or {}, extra or {}, close

    def response(self) -> web.Response:
        body = {"error": self.code, "detail": self.detail, **self.extra}
        return web.json_response(body, status=self.status, headers=self.headers or None)


def error(status: int, code: ErrorCode, detail: str, **headers: str) -> web.Response:
    return Refusal(status, code, detail, headers).response()


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One shape for every refusal, aiohttp's own included; nothing internal leaks out."""
    try:
        return await handler(request)
    except Refusal as r:
        resp = r.response()
        if r.close:  # answer, then hang up at once rather than wait for the rest of a slow body
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            request.protocol.force_close()
        return resp
    except web.HTTPException as e:
        if e.status < 400:
            raise  # redirects and the like are not refusals
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}
        return error(e.status, _HTTP_ERROR_CODES.get(e.status, "http_error"), e.reason, **allow)
    except Exception:  # logged here with its traceback; the caller learns nothing
        logger.exception("unhandled error answering %s %s", request.method, request.path)
        return error(500, "internal", "the gateway failed to answer this request")
