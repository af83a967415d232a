"""When a session ends for want of its end user: ``rejoin_grace_s`` after the last one left,
unless one is back by then.

A caller's reconnect looks like leaving: when a client's connection drops and it cannot
resume, it joins again under the same identity, and LiveKit (v1.13.5) reports the old
participant gone (a duplicate identity, or its 5 s wait for a resume ran out) and a new one
joined. Ending the session at the first departure hung up on callers who were back a
moment later. The agent's own full reconnect looks the same from inside: livekit rtc drops
every remote participant while it reconnects and lists them again once back, so the
absence is counted from the agent's return, never across its own outage.

``Attendance`` is the decision, pure (tested in tests/unit); ``Presence`` wires it to a
room on the job's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from livekit import rtc

logger = logging.getLogger("autonomite.agent.session")


class Attendance:
    """How long the room has been without an end user, and whether the session ends for it."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.met = False  # an end user was here once: before that, user_join_timeout_s rules
        self.empty_since: float | None = None

    def update(self, users: int, now: float, someone_left: bool = False) -> float | None:
        """Record that ``users`` end users are in the room at ``now`` (``someone_left``: one
        was here, LiveKit says, even if we never saw them). Returns when the session ends if
        nobody comes back, or None while it has a user or has never had one."""
        if users:
            self.met, self.empty_since = True, None
            return None
        if not (self.met or someone_left):
            return None
        self.met = True
        if self.empty_since is None:
            self.empty_since = now
        return self.empty_since + self.grace_s

    def restart(self, now: float) -> None:
        """Our own connection is back: whoever left while we were away gets a full grace."""
        if self.empty_since is not None:
            self.empty_since = now

    def over(self, users: int, now: float) -> bool:
        due = self.update(users, now)
        return due is not None and now >= due


def is_user(p: rtc.RemoteParticipant) -> bool:
    return p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


def users(room: rtc.Room) -> list[rtc.RemoteParticipant]:
    return [p for p in room.remote_participants.values() if is_user(p)]


class Presence:
    """Follows the room's end users and calls ``end(reason)`` once none has been there for
    the grace. Lives on the job's event loop, like the room's events."""

    def __init__(self, room: rtc.Room, grace_s: float, end: Callable[[str], None]) -> None:
        self.room, self.end = room, end
        self.attendance = Attendance(grace_s)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        room.on("participant_connected", lambda p: self._changed(p, "joined"))
        room.on("participant_disconnected", lambda p: self._changed(p, "left"))
        room.on("reconnecting", lambda: logger.warning("the agent's connection to LiveKit dropped; reconnecting"))
        room.on("reconnected", self._back)
        self.check()

    def _changed(self, p: rtc.RemoteParticipant, what: str) -> None:
        if not is_user(p):
            return
        # protobuf's enum stubs want their own value type; these are plain ints at run time
        reason = (rtc.DisconnectReason.Name(p.disconnect_reason or 0) if what == "left"  # type: ignore[arg-type]
                  else rtc.ParticipantKind.Name(p.kind))
        logger.info("end user %s %s (%s)", p.identity, what, reason)
        self.check()

    def user_left(self) -> None:
        """LiveKit told the runtime an end user left (a webhook): the agent may have missed it."""
        self.check(someone_left=True)

    def check(self, someone_left: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.room.connection_state != rtc.ConnectionState.CONN_CONNECTED:
            return  # we are the one away: "reconnected" checks again (a failed reconnect ends the job)
        now, present, was_empty = self._loop.time(), len(users(self.room)), self.attendance.empty_since is not None
        due = self.attendance.update(present, now, someone_left)
        if due is None:
            if was_empty:
                logger.info("an end user is back; the session goes on")
            return
        if now >= due:
            logger.info("the last end user left and none came back within %g s; ending the session",
                        self.attendance.grace_s)
            self.end("user left")
            return
        if not was_empty:
            logger.info("the last end user left; the session ends unless one is back within %g s",
                        self.attendance.grace_s)
        self._timer = self._loop.call_at(due, self.check)

    def _back(self) -> None:
        logger.info("the agent is back in the room (%d end users)", len(users(self.room)))
        self.attendance.restart(self._loop.time())
        self.check()
