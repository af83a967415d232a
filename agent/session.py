"""One session in the room: prime the agent from the dispatch metadata and run it.

The worker knows its client's agent catalog; the metadata names which agent to play. The
enhanced system prompt comes from ``agent.priming``; the LLM, STT and TTS from the agent's
config (``agent.providers``: offline, text-only by default). With ``enable_rag`` every user
turn gets the best passages from the client's own documents.

The session ends when the room ends, when no end user has been in the room for
``rejoin_grace_s`` after the last one left (agent.presence: a caller who reconnects leaves
and joins again), or when no end user has joined within ``user_join_timeout_s`` (a
trigger whose user never came must not hold a warm worker forever).

The greeting comes first, whatever the caller does: a typed message or a spoken turn that
arrives before the greeting has been said waits for it, and is then answered once.
Answering it at once interrupted the greeting (lost), and the greeting's own reply could
read the caller's message and answer it too (answered twice).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterable, Callable
from typing import Any, Literal

from livekit import api
from livekit.agents import Agent, AgentSession, JobContext, TurnHandlingOptions, llm, stt
from livekit.agents.voice.room_io import RoomOptions

from agent import hearing, priming, providers
from agent.contract import CatalogAgent, EndCause
from agent.hearing import Hearing
from agent.offline_llm import KNOWLEDGE_HEADER
from agent.presence import Presence, users
from agent.rag import KnowledgeBase
from agent.turns import TypedTurns, background

logger = logging.getLogger("autonomite.agent.session")

GREETING_RELEASE_S = 2.0  # the session lets go of a said greeting within this (agent_activity)
CONNECT_TIMEOUT_S = 10.0  # joining takes well under a second; longer means the room is gone

Milestone = Literal["in_room", "user_joined"]  # what a session's record notes as it happens

# Why each end of a session happens, as its record says it: the reasons passed to
# ctx.shutdown here, livekit-agents' own, and the room events the runtime passes on.
_CAUSES: dict[str, EndCause] = {
    "user left": "user_left", "participant_left": "user_left",
    "no user joined": "no_show",
    "room deleted": "room_deleted", "could not join the room": "room_deleted",
    "room disconnected": "room_deleted",  # livekit-agents: the server closed the agent's connection
    "room_finished": "room_finished",
}


def end_cause(reason: str) -> EndCause:
    """Anything else ended the session from inside the worker (a deaf agent, a crash of
    livekit-agents' job): the worker failed it."""
    return _CAUSES.get(reason, "worker_failed")


class PrimedAgent(Agent):
    """The agent with its primed instructions and, with RAG on, its client's knowledge.
    ``greeted`` is set once the greeting has been said: the caller's words wait for it."""

    def __init__(self, instructions: str, knowledge: KnowledgeBase | None) -> None:
        super().__init__(instructions=instructions)
        self.knowledge = knowledge
        self.greeted = asyncio.Event()
        self.hearing = Hearing()

    async def stt_node(self, audio: AsyncIterable[Any], model_settings: Any) -> AsyncIterable[stt.SpeechEvent]:
        # A caller's turn ends when its transcript comes (turn detection "vad" waits for
        # it): held until the greeting has been said, a turn spoken over the greeting ends
        # after it, and is answered instead of skipped (the greeting cannot be interrupted).
        # The audio itself flows on meanwhile: nothing the caller says is lost.
        async for event in Agent.default.stt_node(self, self._heard(audio), model_settings):
            if not self.greeted.is_set():
                await self.greeted.wait()
            yield event

    async def _heard(self, audio: AsyncIterable[Any]) -> AsyncIterable[Any]:
        """The caller's audio on its way to the recognizer, each frame noted (agent.hearing)."""
        loop = asyncio.get_running_loop()
        async for frame in audio:
            self.hearing.frame(loop.time())
            yield frame

    def llm_node(self, chat_ctx: llm.ChatContext, tools: list[Any], model_settings: Any) -> Any:
        # Here rather than in on_user_turn_completed: that hook runs for spoken turns only,
        # and this node runs for every reply, typed or spoken.
        if self.knowledge is not None:
            chat_ctx = with_passages(chat_ctx, self.knowledge)
        return Agent.default.llm_node(self, chat_ctx, tools, model_settings)


def with_passages(chat_ctx: llm.ChatContext, knowledge: KnowledgeBase) -> llm.ChatContext:
    """A copy of the context with the best passages for the last user turn added."""
    user_turns = [m for m in chat_ctx.items if getattr(m, "role", None) == "user"]
    passages = knowledge.search(getattr(user_turns[-1], "text_content", None) or "", k=3) if user_turns else []
    if not passages:
        return chat_ctx
    chat_ctx = chat_ctx.copy()
    chat_ctx.add_message(role="system", content=KNOWLEDGE_HEADER + "\n" + "\n".join(f"- {p}" for p in passages))
    return chat_ctx


_presence: weakref.WeakKeyDictionary[JobContext, Presence] = weakref.WeakKeyDictionary()


async def run_session(
    ctx: JobContext, catalog: list[CatalogAgent], knowledge: KnowledgeBase | None, user_join_timeout_s: float,
    rejoin_grace_s: float, milestone: Callable[[Milestone], None] = lambda _: None,
) -> None:
    """Join, start the agent, and return: the entrypoint never blocks on the end user.

    livekit-agents gives a still-running entrypoint a 15 s grace at shutdown, so one that
    waited for the user would hold a no-show's worker 15 s past its timeout. The greeting
    and the no-show timer run as tasks instead.
    """
    info = priming.parse_metadata(ctx.job.metadata)
    found = next((a for a in catalog if a.name == info.agent_name), None)
    if found is None:
        logger.warning("agent %r is not in this client's catalog; using the default prompt", info.agent_name)
    config = found or CatalogAgent(info.agent_name or "")
    for warning in info.warnings:
        logger.warning("dispatch metadata: %s", warning)
    logger.info("enhanced metadata extraction: %s", json.dumps(priming.extraction_log(info), sort_keys=True))
    instructions = priming.build_prompt(config.system_prompt or None, info)
    use_rag = config.enable_rag and knowledge is not None

    typed = TypedTurns(ctx.room)  # before joining: a message may come with the join
    try:
        await asyncio.wait_for(ctx.connect(), CONNECT_TIMEOUT_S)
    except TimeoutError:
        logger.warning("could not join room %s within %g s; ending the session", ctx.job.room.name, CONNECT_TIMEOUT_S)
        ctx.shutdown("could not join the room")
        return
    if ctx.job.room.sid and await ctx.room.sid != ctx.job.room.sid:
        # The dispatched room was deleted before we joined, and joining created a new,
        # empty one of the same name: nobody will ever come. End instead of waiting.
        logger.info("room %s was deleted before the agent joined; ending the session", ctx.room.name)
        if not ctx.room.remote_participants:  # the ghost is ours alone: take it down too
            await ctx.api.room.delete_room(api.DeleteRoomRequest(room=ctx.room.name))
        ctx.shutdown("room deleted")
        return
    logger.info("joined room %s", ctx.room.name)
    milestone("in_room")
    stt = providers.make_stt(config.stt)
    tts = providers.make_tts(config.tts, config.voice_id)
    # Without speech input there are no turns to detect: a typed message is a turn. Left to
    # itself, livekit-agents would build its local end-of-turn model for every session
    # (~350 ms of CPU each, measured with py-spy), which a burst of sessions pays in full.
    # Offline speech: a turn ends when silero's VAD hears the caller stop, after the agent's
    # end_of_turn_s of silence. That is also the endpointing delay: a shorter delay would
    # change nothing, a longer one would add to the window. Cloud STT keeps its own turns.
    pause = providers.silence_window(config)
    offline_voice = config.offline_speech
    turns: TurnHandlingOptions = ({"turn_detection": "manual"} if stt is None else
                   {"turn_detection": "vad", "endpointing": {"min_delay": pause}} if offline_voice else {})
    if stt is not None:  # words said over the greeting reach the recognizer (answered after it)
        turns["interruption"] = {"discard_audio_if_uninterruptible": False}
    session: AgentSession[Any] = AgentSession(llm=providers.make_llm(config.llm), stt=stt, tts=tts, turn_handling=turns,
                           vad=providers.vad(pause) if stt is not None else None)
    agent = PrimedAgent(instructions, knowledge if use_rag else None)
    await session.start(
        agent,
        room=ctx.room,
        room_options=RoomOptions(
            text_input=False,  # typed turns: agent.turns.TypedTurns
            text_output=True, audio_input=providers.audio_input(config), audio_output=tts is not None,
            close_on_disconnect=False,  # the session's end is ours to decide: agent.presence
        ),
    )
    typed.start(session, agent.greeted)
    _presence[ctx] = Presence(ctx.room, rejoin_grace_s, ctx.shutdown)
    if stt is not None:
        _log_voice_metrics(session)
        watching = background(hearing.watch(ctx.room, session, agent.hearing, ctx.shutdown))
        session.on("close", lambda _: watching.cancel())
    background(_greet_or_give_up(ctx, session, user_join_timeout_s, agent.greeted, milestone))


def _log_voice_metrics(session: AgentSession[Any]) -> None:
    """One log line per stage of each spoken turn: where a voice turn's time goes
    (bench/voice_turn.py reads them). livekit-agents measures them; we only keep them."""
    fields = {"STTMetrics": ("duration", "audio_duration"), "EOUMetrics": ("end_of_utterance_delay",
              "transcription_delay"), "LLMMetrics": ("ttft", "duration"), "TTSMetrics": ("ttfb", "duration")}

    @session.on("metrics_collected")
    def _collected(event: Any) -> None:
        kind = type(event.metrics).__name__
        if kind in fields:
            values = {f: round(float(getattr(event.metrics, f)), 4) for f in fields[kind]}
            logger.info("voice metric %s", json.dumps({"kind": kind, **values}, sort_keys=True))


async def _greet_or_give_up(ctx: JobContext, session: AgentSession[Any], join_timeout_s: float,
                            greeted: asyncio.Event, milestone: Callable[[Milestone], None]) -> None:
    try:
        await asyncio.wait_for(ctx.wait_for_participant(), join_timeout_s)
    except TimeoutError:
        logger.info("no end user joined within %g s; ending the session", join_timeout_s)
        ctx.shutdown("no user joined")
        return
    milestone("user_joined")
    # The first words: a greeting that already knows the user. Nothing the caller says
    # interrupts it; what they said meanwhile is answered once it has been said.
    try:
        greeting = session.generate_reply(allow_interruptions=False)
        await greeting
        # Its handle is done a moment before the session lets go of it as the current
        # speech; a turn committed in between would be skipped as "cannot interrupt".
        deadline = asyncio.get_running_loop().time() + GREETING_RELEASE_S
        while session.current_speech is greeting and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
    finally:
        greeted.set()  # said, or failed to be: the caller's words must not wait forever


def end_session(ctx: JobContext, entry: asyncio.Task[Any] | None, reason: str, if_no_users: bool) -> None:
    """From the runtime (a LiveKit webhook): the room ended, or maybe its last user left.

    Runs on the job's loop. An entrypoint still joining is cancelled rather than given
    livekit-agents' 15 s grace: the room it is joining is gone.
    """
    presence = _presence.get(ctx)
    if if_no_users and presence is not None and ctx.room.isconnected():
        presence.user_left()  # the grace applies: the caller may be reconnecting
        return
    if if_no_users and ctx.room.isconnected() and users(ctx.room):
        return
    logger.info("ending the session: %s", reason)
    ctx.shutdown(reason)
    if entry is not None and not entry.done():
        entry.cancel()
