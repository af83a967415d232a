"""The LiveKit adapter: server API calls with a client's own credentials, off the actors' threads.

livekit-api is asyncio; actors are threads. The adapter owns one event loop in a thread
of its own and hands out ``concurrent.futures.Future``s, so a DispatchActor submits a call
and goes back to its mailbox; the result returns to it as a message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, TypeVar

from google.protobuf.json_format import Parse, ParseError
from livekit import api

from runtime.settings import LiveKitSettings

T = TypeVar("T")


class LiveKitClient:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="livekit-io", daemon=True)
        self._thread.start()
        self._apis: dict[tuple[str, str], api.LiveKitAPI] = {}

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run a coroutine on the adapter's loop; the caller's thread goes on at once."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def create_dispatch(self, lk: LiveKitSettings, agent_name: str, room: str, metadata: str) -> str:
        """Create an explicit dispatch (on the adapter's loop); return its id."""
        request = api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata)
        dispatch = await self._api(lk).agent_dispatch.create_dispatch(request)
        return dispatch.id

    async def delete_dispatch(self, lk: LiveKitSettings, dispatch_id: str, room: str) -> None:
        await self._api(lk).agent_dispatch.delete_dispatch(dispatch_id, room)

    def _api(self, lk: LiveKitSettings) -> api.LiveKitAPI:
        # One HTTP session per key pair, reused across calls; runs on the adapter's loop only.
        key = (lk.http_url, lk.fingerprint)
        if key not in self._apis:
            self._apis[key] = api.LiveKitAPI(lk.http_url, lk.api_key.get_secret_value(), lk.api_secret.get_secret_value())
        return self._apis[key]

    def close(self) -> None:
        async def close_all() -> None:
            for client in self._apis.values():
                await client.aclose()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def participant_token(lk: LiveKitSettings, room: str, identity: str, ttl: timedelta = timedelta(minutes=10)) -> str:
    """A short-lived token that lets one end user join one room, signed with the client's key."""
    return (
        api.AccessToken(lk.api_key.get_secret_value(), lk.api_secret.get_secret_value())
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_ttl(ttl)
        .to_jwt()
    )


# The events a LiveKit server sends (livekit/protocol's webhook package). Any other name is
# still answered, so a newer server's new event is not retried forever, but it is counted as
# "other": a metric label is never a free string a caller chose.
LIVEKIT_EVENTS = frozenset({
    "room_started", "room_finished", "participant_joined", "participant_left",
    "participant_connection_aborted", "track_published", "track_unpublished",
    "egress_started", "egress_updated", "egress_ended", "ingress_started", "ingress_ended",
})
_PARSE_STEP = re.compile(r"Failed to parse (\w+) field: ")


class InvalidEvent(ValueError):
    """A signed body that is not a LiveKit WebhookEvent; ``field`` says where."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def verify_webhook(lk: LiveKitSettings, body: str, authorization: str) -> None:
    """Returns only if LiveKit signed exactly ``body`` with this client's key pair.

    The check is kept apart from parsing so that a body that is signed but malformed is
    answered as malformed (400/422), not as a bad signature (401).
    """
    claims = api.TokenVerifier(lk.api_key.get_secret_value(), lk.api_secret.get_secret_value()).verify(authorization)
    signed = base64.b64decode(claims.sha256 or "", validate=True)
    if not signed or not hmac.compare_digest(signed, hashlib.sha256(body.encode()).digest()):
        raise ValueError("the signature does not cover this body")


def parse_webhook(body: str) -> api.WebhookEvent:
    """The event in a verified body; raises InvalidEvent naming the field that is wrong."""
    try:
        event = Parse(body, api.WebhookEvent(), ignore_unknown_fields=True)
    except ParseError as e:  # "Failed to parse room field: Failed to parse name field: expected ..."
        path, rest = [], str(e)
        while (step := _PARSE_STEP.match(rest)) is not None:
            path.append(step.group(1))
            rest = rest[step.end():]
        raise InvalidEvent(".".join(path) or "(body)", rest.rstrip(".")[:200] or "not a WebhookEvent") from None
    if not event.event:
        raise InvalidEvent("event", "missing: every LiveKit webhook names its event")
    return event
