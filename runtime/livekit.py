"""The LiveKit adapter: server API calls with a client's own credentials, off the actors' threads.

livekit-api is asyncio; actors are threads. The adapter owns one event loop in a thread
of its own and hands out ``concurrent.futures.Future``s, so a DispatchActor submits a call
and goes back to its mailbox; the result returns to it as a message.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Coroutine, TypeVar

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


def verify_webhook(lk: LiveKitSettings, body: str, authorization: str) -> api.WebhookEvent:
    """The event, if LiveKit signed it with this client's key pair; raises otherwise."""
    receiver = api.WebhookReceiver(api.TokenVerifier(lk.api_key.get_secret_value(), lk.api_secret.get_secret_value()))
    return receiver.receive(body, authorization)
