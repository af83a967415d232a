"""An agent's last words: the runtime ends a session that is still live (a shutdown that
cannot wait any longer), and the agent tells the caller why before it leaves.

Runs on the job's loop, like ``agent.session.end_session``. Saying it is bounded: the
session ends within ``LAST_WORDS_TIMEOUT_S`` whatever the speech does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from livekit import rtc
from livekit.agents import JobContext

logger = logging.getLogger("autonomite.agent.session")

LAST_WORDS_TIMEOUT_S = 10.0
_saying: set[asyncio.Task[Any]] = set()  # strong references: the loop keeps only weak ones


def say_then_end(ctx: JobContext, entry: asyncio.Task[Any] | None, reason: str) -> None:
    """Say ``reason`` to the caller, then end the session (at once if nobody is there)."""
    try:
        session = ctx.primary_session
    except RuntimeError:  # still joining: no agent session yet
        session = None
    callers = [p for p in ctx.room.remote_participants.values() if p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT]
    if session is None or not ctx.room.isconnected() or not callers:
        logger.info("ending the session: %s", reason)
        ctx.shutdown(reason)
        if entry is not None and not entry.done():
            entry.cancel()
        return
    logger.info("ending the session, saying why first")
    task = asyncio.ensure_future(_say_then_end(ctx, session, reason))
    _saying.add(task)
    task.add_done_callback(_saying.discard)


async def _say_then_end(ctx: JobContext, session, reason: str) -> None:  # noqa: ANN001
    try:
        handle = session.say(reason, allow_interruptions=False)
        await asyncio.wait_for(handle.wait_for_playout(), LAST_WORDS_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - the session ends all the same
        logger.warning("could not say why the session ends: %s", e)
    ctx.shutdown("ended by the runtime")
