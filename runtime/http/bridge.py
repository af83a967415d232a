"""From the gateway's asyncio loop to an actor and back, without blocking the loop.

pykka futures are awaitable, but awaiting one calls its blocking ``get()``: the whole
gateway would stall behind a slow actor. Instead the message carries a ``reply``
callable; the actor calls it from its own thread, and ``call_soon_threadsafe`` resolves an
asyncio future on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from actors.messages import Reply


async def ask(send: Callable[[Reply], None], timeout: float) -> Any:
    """``send(reply)`` must deliver a message whose handler eventually calls ``reply``."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def reply(value: Any) -> None:
        try:
            loop.call_soon_threadsafe(_resolve, future, value)
        except RuntimeError:
            pass  # the loop has closed (shutdown): nobody is waiting for this answer

    send(reply)
    return await asyncio.wait_for(future, timeout)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # the caller may have timed out meanwhile
        future.set_result(value)
