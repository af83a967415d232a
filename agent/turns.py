"""The end user's typed turns (``lk.chat``): answered one by one, in the order they came,
each only once the greeting has been said.

livekit-agents' own handler answers a message at once, which interrupts a greeting still
being made (the greeting is lost) while the greeting's reply may read the message and answer
it too (answered twice). It also drops a message whose sender the room does not list yet,
and a message sent right after joining can overtake the join. So the session owns the
topic: the handler is registered before the agent joins, a message waits for its sender
(up to ``SENDER_WAIT_S``) and for the greeting, and is then answered the way livekit-agents
answers one (its own callback: interrupt whatever is said, then reply).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice.room_io import TextInputEvent, TextInputOptions

from agent.presence import is_user

logger = logging.getLogger("autonomite.agent.session")

TOPIC = "lk.chat"
SENDER_WAIT_S = 10.0  # a message whose sender the room has not listed by then is dropped

_tasks: set[asyncio.Task[Any]] = set()  # strong references: the loop keeps only weak ones


def background(coro) -> asyncio.Task[Any]:  # noqa: ANN001
    task = asyncio.create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


class TypedTurns:
    def __init__(self, room: rtc.Room) -> None:
        self.room = room
        self._queue: asyncio.Queue[tuple[rtc.TextStreamReader, asyncio.Future[Any], str]] = asyncio.Queue()
        room.register_text_stream_handler(TOPIC, self._on_message)

    def _on_message(self, reader: rtc.TextStreamReader, identity: str) -> None:
        self._queue.put_nowait((reader, asyncio.ensure_future(reader.read_all()), identity))

    def start(self, session: AgentSession[Any], greeted: asyncio.Event) -> None:
        """Answer the messages, those that came already first, once ``greeted`` is set."""
        task = background(self._answer_in_order(session, greeted))
        session.on("close", lambda _: task.cancel())

    async def _answer_in_order(self, session: AgentSession[Any], greeted: asyncio.Event) -> None:
        answer = TextInputOptions().text_input_cb  # livekit-agents' own
        while True:
            reader, reading, identity = await self._queue.get()
            try:
                text, sender = await reading, await self._sender(identity)
                if sender is None or not is_user(sender):
                    logger.warning("a message from %s, not an end user in the room, was dropped", identity)
                    continue
                await greeted.wait()
                result = answer(session, TextInputEvent(text=text, info=reader.info, participant=sender))
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # a bad message is dropped, never the session's typed turns
                logger.warning("a typed message could not be answered", exc_info=True)

    async def _sender(self, identity: str) -> rtc.RemoteParticipant | None:
        """The participant ``identity``, once the room lists them (within SENDER_WAIT_S)."""
        joined = asyncio.Event()

        def on_join(p: rtc.RemoteParticipant) -> None:
            if p.identity == identity:
                joined.set()

        self.room.on("participant_connected", on_join)
        try:
            if identity not in self.room.remote_participants:
                await asyncio.wait_for(joined.wait(), SENDER_WAIT_S)
        except TimeoutError:
            return None
        finally:
            self.room.off("participant_connected", on_join)
        return self.room.remote_participants.get(identity)
