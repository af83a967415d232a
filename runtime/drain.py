"""How ``serve`` goes down: the drain policy, as pure decisions (no I/O, no clock of its own).

A deploy must never hang up on a caller, so the first SIGTERM (or SIGINT, or
``POST /api/v1/admin/shutdown``) *drains*: no new session is taken, idle workers stop, and
the sessions in progress go on until they end by themselves. Only two things cut them short,
and both say so to the caller first (their agent speaks ``runtime.shutdown.end_message``):

- the drain timeout, ``runtime.shutdown.drain_timeout_s`` (600 s by default): the sessions
  still running are ended, given ``END_GRACE_S`` to wrap up, then ``serve`` stops anyway;
- an operator who insists: a second SIGTERM or SIGINT during the drain, or
  ``POST /api/v1/admin/shutdown?now=1`` at any time, ends the sessions and stops at once.

``serve`` exits 0 in every one of these cases: each is a shutdown someone asked for. The
loop that feeds this policy (``runtime/server/serve.py``) applies the actions it returns; every
action carries ``why``, the line the log gets, which names the cause.

Phases: ``serving -> draining [-> ending] -> stopping``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Cause = Literal["SIGTERM", "SIGINT", "admin", "admin_now"]
Phase = Literal["serving", "draining", "ending", "stopping"]

END_GRACE_S = 20.0  # after the sessions were told to end: time for the agent's last words and the exit

_SAID = {"SIGTERM": "SIGTERM", "SIGINT": "SIGINT", "admin": "POST /api/v1/admin/shutdown",
         "admin_now": "POST /api/v1/admin/shutdown?now=1"}


@dataclass(frozen=True)
class BeginDrain:
    """Take no new session; idle workers stop; sessions in progress go on."""

    why: str


@dataclass(frozen=True)
class EndSessions:
    """End every session still running (its agent says the end message first)."""

    why: str


@dataclass(frozen=True)
class Stop:
    """Close the gateway and stop the runtime now."""

    why: str


Action = BeginDrain | EndSessions | Stop


@dataclass
class DrainPolicy:
    drain_timeout_s: float
    end_grace_s: float = END_GRACE_S
    phase: Phase = "serving"
    deadline: float | None = None  # when :meth:`tick` acts next

    def request(self, cause: Cause, now: float) -> list[Action]:
        """A shutdown was asked for (a signal, or the admin endpoint)."""
        said = _SAID[cause]
        if self.phase == "stopping":
            return []
        if cause == "admin_now":
            return self._end_and_stop(f"{said}: ending every session and stopping now", begin=self.phase == "serving")
        if self.phase == "serving":
            self.phase, self.deadline = "draining", now + self.drain_timeout_s
            return [BeginDrain(f"{said}: draining (no new sessions; live sessions may go on for up to "
                               f"{self.drain_timeout_s:g} s; SIGTERM or SIGINT again stops at once)")]
        if cause == "admin":  # asked to drain again: it already is
            return []
        return self._end_and_stop(f"{said} during the drain: ending every session and stopping now")

    def drained(self, now: float) -> list[Action]:
        """The last session ended and every worker is gone."""
        if self.phase not in ("draining", "ending"):
            return []
        self.phase, self.deadline = "stopping", None
        return [Stop("drained: every session has ended")]

    def tick(self, now: float) -> list[Action]:
        """Time passed: act on a deadline that is due."""
        if self.deadline is None or now < self.deadline:
            return []
        if self.phase == "draining":
            self.phase, self.deadline = "ending", now + self.end_grace_s
            return [EndSessions(f"drain timeout ({self.drain_timeout_s:g} s) reached: ending the sessions still "
                                "running")]
        if self.phase == "ending":
            self.phase, self.deadline = "stopping", None
            return [Stop(f"sessions still running {self.end_grace_s:g} s after they were told to end: stopping "
                         "anyway")]
        return []

    def _end_and_stop(self, why: str, begin: bool = False) -> list[Action]:
        self.phase, self.deadline = "stopping", None
        return [*([BeginDrain(why)] if begin else []), EndSessions(why), Stop(why)]
