"""The gateway's wire shapes: the trigger body it accepts and the error codes it refuses with.

They live apart from ``runtime.http.gateway`` so that the OpenAPI document (``runtime.http.openapi``)
is built from the very models the handlers validate with, without importing the gateway:
the document cannot drift from the validation it describes.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.http.guard import invalid_unicode_path

if TYPE_CHECKING:
    from actors.messages import PoolStats

MAX_CONTEXT_BYTES = 16 * 1024
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")  # used with fullmatch: "x@y\n" is no address

ErrorCode = Literal[
    "unauthorized", "forbidden", "too_many_failures", "invalid_signature",  # who is asking
    "unknown_client", "unknown_agent", "not_found", "method_not_allowed",  # what is asked for
    "body_too_large", "request_timeout", "malformed_json", "invalid_body", "invalid_query",  # how it is asked
    "restarting", "draining", "timeout", "failed", "config_error", "http_error", "internal",  # what went wrong
]
# Refusals the dispatcher itself words (actors/dispatch.py) and the gateway passes through.
DispatchErrorCode = Literal["no_idle_worker", "livekit_error"]


class TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(min_length=1, max_length=64)
    agent: str = Field(min_length=1, max_length=64)
    room_name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    user_email: str | None = Field(None, max_length=320)
    context: dict[str, Any] | None = None
    conversation_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")

    @field_validator("user_email")
    @classmethod
    def _email_shape(cls, v: str | None) -> str | None:
        if v is not None and not _EMAIL.fullmatch(v):
            raise ValueError("not an email address")
        return v

    @field_validator("context")
    @classmethod
    def _context_sound(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # pydantic refuses lone surrogates in str fields itself, but not inside a plain dict.
        where = invalid_unicode_path(v) if v is not None else None
        if where:
            raise ValueError(f"a string at context{where} is not valid Unicode (a lone surrogate)")
        if v is not None and len(json.dumps(v)) > MAX_CONTEXT_BYTES:
            raise ValueError(f"larger than {MAX_CONTEXT_BYTES} bytes as JSON")
        return v


@dataclass(frozen=True)
class StatsQuery:
    client: str | None = None
    limit: int = 100
    cursor: str | None = None


STATS_MAX_LIMIT = 1000


def parse_stats_query(query: Mapping[str, str]) -> StatsQuery:
    """The stats route's query; ValueError says what is wrong (the gateway answers 400)."""
    unknown = sorted(set(query) - {"client", "limit", "cursor"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}: the parameters are client, limit and cursor")
    limit = query.get("limit", "100")
    if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= STATS_MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {STATS_MAX_LIMIT}")
    for name in ("client", "cursor"):
        value = query.get(name)
        if value is not None and not 1 <= len(value) <= 64:
            raise ValueError(f"{name} must be a client id (1 to 64 characters)")
    return StatsQuery(query.get("client"), int(limit), query.get("cursor"))


def summarize(configured: int, running: Iterable[PoolStats]) -> dict[str, int]:
    """Totals over the running pools (a client at zero adds nothing) and the client counts."""
    totals = {"clients": configured, "running_pools": 0, "starting": 0, "idle": 0, "leased": 0, "draining": 0,
              "waiting": 0, "missed_total": 0}
    for s in running:
        totals["running_pools"] += 1
        for key in ("starting", "idle", "leased", "draining", "waiting", "missed_total"):
            totals[key] += getattr(s, key)
    return totals



# -- session records: GET /api/v1/sessions and /api/v1/usage ----------------------------

SESSIONS_MAX_LIMIT = 1000


@dataclass(frozen=True)
class SessionsQuery:
    client: str | None = None
    since: float | None = None  # Unix seconds, received at or after
    until: float | None = None  # received before
    after: tuple[float, str] | None = None  # the cursor: the last record of the page before
    limit: int = 100


@dataclass(frozen=True)
class UsageQuery:
    client: str | None
    since: float
    until: float


LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z: the last time an ISO 8601 date can say


def parse_time(name: str, value: str) -> float:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it names its offset), from
    1970 to the year 9999: a time the records and their answers can both express."""
    try:
        at = float(value) if value.replace(".", "", 1).isdigit() else _iso(value)
    except (ValueError, OverflowError):
        at = -1.0
    if not 0 <= at <= LAST_SECOND:  # NaN fails this too
        raise ValueError(f"{name} must be Unix seconds or an ISO 8601 time from 1970 to 9999, "
                         "like 2026-11-01T00:00:00Z")
    return at


def _iso(value: str) -> float:
    at = datetime.fromisoformat(value)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def encode_cursor(received_at: float, session_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([received_at, session_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        at, sid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(at, int | float) and isinstance(sid, str):
            return float(at), sid
    except (ValueError, TypeError):
        pass
    raise ValueError("cursor is not a next_cursor this route gave")


def _known(query: Mapping[str, str], names: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(names))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}: the parameters are {', '.join(names)}")
    client = query.get("client")
    if client is not None and not 1 <= len(client) <= 64:
        raise ValueError("client must be a client id (1 to 64 characters)")


def parse_sessions_query(query: Mapping[str, str]) -> SessionsQuery:
    _known(query, ("client", "since", "until", "cursor", "limit"))
    limit = query.get("limit", "100")
    if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= SESSIONS_MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {SESSIONS_MAX_LIMIT}")
    since = parse_time("since", query["since"]) if "since" in query else None
    until = parse_time("until", query["until"]) if "until" in query else None
    after = _decode_cursor(query["cursor"]) if "cursor" in query else None
    return SessionsQuery(query.get("client"), since, until, after, int(limit))


def parse_usage_query(query: Mapping[str, str], now: float) -> UsageQuery:
    """``from`` defaults to the start of this month (UTC), ``to`` to now: a month to date."""
    _known(query, ("client", "from", "to"))
    month = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    since = parse_time("from", query["from"]) if "from" in query else month.timestamp()
    until = parse_time("to", query["to"]) if "to" in query else now
    if until <= since:
        raise ValueError("to must come after from")
    return UsageQuery(query.get("client"), since, until)
