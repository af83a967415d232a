"""One session in the room: read the dispatch metadata, join, stay while the session lasts.

The session ends when the room ends, when the last end user leaves, or when no end user
has joined within ``AUTONOMITE_USER_JOIN_TIMEOUT_S`` (a trigger whose user never came must
not hold a warm worker forever).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from livekit import rtc
from livekit.agents import JobContext

logger = logging.getLogger("autonomite.agent.session")


def _is_user(p: rtc.RemoteParticipant) -> bool:
    return p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


async def run_session(ctx: JobContext, catalog: list[dict]) -> None:
    try:
        metadata = json.loads(ctx.job.metadata or "{}")
    except json.JSONDecodeError:
        logger.warning("dispatch metadata is not JSON; using defaults")
        metadata = {}
    logger.info(
        "job %s for room %s, agent %s, metadata keys %s",
        ctx.job.id,
        ctx.job.room.name,
        metadata.get("agent_name") if isinstance(metadata, dict) else None,
        sorted(metadata) if isinstance(metadata, dict) else [],
    )
    await ctx.connect()
    logger.info("joined room %s", ctx.room.name)
    _end_when_users_leave(ctx, float(os.environ.get("AUTONOMITE_USER_JOIN_TIMEOUT_S", "120")))


def _end_when_users_leave(ctx: JobContext, join_timeout_s: float) -> None:
    room = ctx.room

    def users() -> list:
        return [p for p in room.remote_participants.values() if _is_user(p)]

    async def no_show() -> None:
        await asyncio.sleep(join_timeout_s)
        if not users():
            logger.info("no end user joined within %g s; ending the session", join_timeout_s)
            ctx.shutdown("no user joined")

    if not users():
        asyncio.create_task(no_show())

    @room.on("participant_disconnected")
    def _left(p: rtc.RemoteParticipant) -> None:
        if _is_user(p) and not users():
            logger.info("the last end user left; ending the session")
            ctx.shutdown("user left")
