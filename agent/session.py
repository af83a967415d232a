"""One session in the room: prime the agent from the dispatch metadata and run it.

The worker knows its client's agent catalog; the metadata names which agent to play. The
enhanced system prompt comes from ``agent.priming``; the LLM, STT and TTS from the agent's
config (``agent.providers``: offline, text-only by default). With ``enable_rag`` every user
turn gets the best passages from the client's own documents.

The session ends when the room ends, when the last end user leaves, or when no end user
has joined within ``user_join_timeout_s`` (a trigger whose user never came must
not hold a warm worker forever).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from livekit import rtc
from livekit.agents import Agent, AgentSession, JobContext, llm
from livekit.agents.voice.room_io import RoomOptions

from agent import priming, providers
from agent.offline_llm import KNOWLEDGE_HEADER
from agent.rag import KnowledgeBase

logger = logging.getLogger("autonomite.agent.session")


class PrimedAgent(Agent):
    """The agent with its primed instructions and, with RAG on, its client's knowledge."""

    def __init__(self, instructions: str, knowledge: KnowledgeBase | None) -> None:
        super().__init__(instructions=instructions)
        self.knowledge = knowledge

    def llm_node(self, chat_ctx: llm.ChatContext, tools: list, model_settings: Any) -> Any:
        # Here rather than in on_user_turn_completed: that hook runs for spoken turns only,
        # and this node runs for every reply, typed or spoken.
        if self.knowledge is not None:
            chat_ctx = with_passages(chat_ctx, self.knowledge)
        return Agent.default.llm_node(self, chat_ctx, tools, model_settings)


def with_passages(chat_ctx: llm.ChatContext, knowledge: KnowledgeBase) -> llm.ChatContext:
    """A copy of the context with the best passages for the last user turn added."""
    user_turns = [m for m in chat_ctx.items if getattr(m, "role", None) == "user"]
    passages = knowledge.search(user_turns[-1].text_content or "", k=3) if user_turns else []
    if not passages:
        return chat_ctx
    chat_ctx = chat_ctx.copy()
    chat_ctx.add_message(role="system", content=KNOWLEDGE_HEADER + "\n" + "\n".join(f"- {p}" for p in passages))
    return chat_ctx


def _is_user(p: rtc.RemoteParticipant) -> bool:
    return p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


async def run_session(
    ctx: JobContext, catalog: list[dict], knowledge: KnowledgeBase | None, user_join_timeout_s: float
) -> None:
    info = priming.parse_metadata(ctx.job.metadata)
    config = next((a for a in catalog if a.get("name") == info.agent_name), None)
    if config is None:
        logger.warning("agent %r is not in this client's catalog; using the default prompt", info.agent_name)
    for warning in info.warnings:
        logger.warning("dispatch metadata: %s", warning)
    logger.info("enhanced metadata extraction: %s", json.dumps(priming.extraction_log(info), sort_keys=True))
    config = config or {}
    instructions = priming.build_prompt(config.get("system_prompt"), info)
    use_rag = bool(config.get("enable_rag")) and knowledge is not None

    await ctx.connect()
    logger.info("joined room %s", ctx.room.name)
    stt = providers.make_stt(config.get("stt"))
    tts = providers.make_tts(config.get("tts"), config.get("voice_id", "alloy"))
    session = AgentSession(llm=providers.make_llm(config.get("llm")), stt=stt, tts=tts)
    await session.start(
        PrimedAgent(instructions, knowledge if use_rag else None),
        room=ctx.room,
        room_options=RoomOptions(
            text_input=True, text_output=True, audio_input=stt is not None, audio_output=tts is not None,
            close_on_disconnect=False,  # the session's end is ours to decide, below
        ),
    )
    _end_when_users_leave(ctx, user_join_timeout_s)
    await ctx.wait_for_participant()
    session.generate_reply()  # the first words: a greeting that already knows the user


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
