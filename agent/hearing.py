"""A voice session never sits deaf: while its caller publishes a microphone, the caller's
audio must keep reaching the agent's speech recognizer.

An agent heard nothing more from a caller who was still there after its own connection
to LiveKit was recovered. What was measured here (livekit rtc 1.1.21, livekit-agents 1.8.9,
livekit-server 1.13.5; see tests/integration/test_session.py): a resumed connection keeps
every subscription; a full reconnect drops every remote participant and lists them again,
and RoomIO takes the caller's new track by identity; livekit-server ends a job whose agent
rejoined in full (TerminateJob, AGENT_LEFT_ROOM). A subscription the server drops while
the agent stays (RoomService.UpdateSubscriptions, or anything else that unsubscribes it)
is never asked for again: RoomIO waits for a track that only a new subscription brings.

So the session does not trust any one layer. Audio frames flow all the time from a
published microphone (silence too), so when none has reached the recognizer for
``DEAF_S`` the input is dead: the agent subscribes to the caller's microphone again and
relinks its input; if that brings nothing within ``DEAF_S`` more, the session ends with a
reason instead of keeping a deaf agent in the call.

``Hearing`` is the decision, pure (tested in tests/unit); ``watch`` runs it on the job's loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

from livekit import rtc
from livekit.agents import AgentSession

from agent.presence import users

logger = logging.getLogger("autonomite.agent.session")

DEAF_S = 5.0  # no audio from a publishing caller this long: the input is dead (a frame is 50 ms)
CHECK_S = 1.0

Verdict = Literal["ok", "recover", "give up"]


class Hearing:
    """When the caller's audio last reached the agent, and what to do about a silence."""

    def __init__(self, deaf_s: float = DEAF_S) -> None:
        self.deaf_s = deaf_s
        self.heard_at: float | None = None  # the last frame, or when audio was first expected
        self.recovered_at: float | None = None  # the input was rebuilt then, and nothing since

    def frame(self, now: float) -> None:
        self.heard_at, self.recovered_at = now, None

    def check(self, now: float, expecting: bool) -> Verdict:
        """``expecting``: the agent is connected and its caller publishes an unmuted
        microphone, so audio frames must be arriving."""
        if not expecting:
            self.heard_at = self.recovered_at = None
            return "ok"
        if self.heard_at is None:
            self.heard_at = now
        if self.recovered_at is not None:
            return "give up" if now - self.recovered_at >= self.deaf_s else "ok"
        if now - self.heard_at >= self.deaf_s:
            self.recovered_at = now
            return "recover"
        return "ok"


def microphone(p: rtc.RemoteParticipant) -> rtc.RemoteTrackPublication | None:
    """The participant's unmuted microphone, if they publish one."""
    return next((pub for pub in p.track_publications.values()
                 if pub.source == rtc.TrackSource.SOURCE_MICROPHONE and not pub.muted), None)


async def watch(room: rtc.Room, session: AgentSession[Any], hearing: Hearing, end: Callable[[str], None]) -> None:
    loop = asyncio.get_running_loop()
    for event in ("track_subscribed", "track_unsubscribed"):
        room.on(event, functools.partial(_log_microphone, event))
    while True:
        await asyncio.sleep(CHECK_S)
        caller = session.room_io.linked_participant or next(iter(users(room)), None)
        mic = microphone(caller) if caller is not None else None
        connected = room.connection_state == rtc.ConnectionState.CONN_CONNECTED
        verdict = hearing.check(loop.time(), expecting=connected and mic is not None)
        if verdict == "recover" and caller is not None and mic is not None:  # it expected audio: both exist
            logger.warning("no audio from %s for %g s although their microphone is published; subscribing "
                           "to it again (subscribed: %s)", caller.identity, hearing.deaf_s, mic.subscribed)
            _listen_again(session, caller, mic)
        elif verdict == "give up":
            logger.error("still no audio from %s %g s after subscribing again; ending the session rather than "
                         "staying in the call deaf", caller.identity if caller else "the caller", hearing.deaf_s)
            end("lost the caller's audio")
            return


def _log_microphone(event: str, track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
    if pub.source == rtc.TrackSource.SOURCE_MICROPHONE:
        logger.info("%s: %s's microphone %s", event, who.identity, pub.sid)


def _listen_again(session: AgentSession[Any], caller: rtc.RemoteParticipant, mic: rtc.RemoteTrackPublication) -> None:
    """Ask LiveKit for the caller's microphone again: RoomIO, linked to the caller by
    identity, reads the new track on arrival. Relinking RoomIO as well is not needed, and
    it restarts its echo-cancellation warm-up (3 s in which the caller is not heard)."""
    mic.set_subscribed(True)
