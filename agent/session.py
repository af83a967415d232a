"""One session in the room: read the dispatch metadata, join, stay until the room ends."""

from __future__ import annotations

import json
import logging

from livekit.agents import JobContext

logger = logging.getLogger("autonomite.agent.session")


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
        metadata.get("agent_name"),
        sorted(metadata) if isinstance(metadata, dict) else [],
    )
    await ctx.connect()
    logger.info("joined room %s", ctx.room.name)
