"""What a worker does when the runtime that started it dies: pure decisions, no I/O, no clock.

A crash of ``serve`` must cut no call, yet nothing may run forever or sit idle without a
runtime. So, once a worker learns that its runtime is gone (its *lifeline*, a pipe whose
other end only the runtime holds, reads end of file: ``agent/worker.py``):

- a worker in no session (starting, idle, claimed but no job yet) exits at once: no
  runtime will ever lease it, and a new runtime starts its own;
- a worker in a session goes on. The next runtime adopts it (``runtime/backends/process.py``)
  and from then on follows it on its status port, as every runtime follows its workers
  (a long poll every couple of seconds). The worker counts as *followed* while such
  authenticated requests come; once none has come for ``bound_s`` (no runtime adopted it,
  or the one that did died too), it ends the session, its agent saying why, and exits.

The bound counts from the later of the runtime's death and the last request heard, so a
worker adopted by a runtime that then dies as well gets the whole bound again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What the agent says when no runtime adopted it within the bound (the caller hears it).
END_MESSAGE = "I'm sorry, this service had a problem and has to end our call now. Please call again."


@dataclass
class Orphan:
    """One worker whose runtime died at ``gone_at`` (monotonic seconds)."""

    bound_s: float
    gone_at: float

    @staticmethod
    def on_runtime_gone(in_session: bool) -> Literal["exit", "stay"]:
        """Only a session is worth outliving the runtime for."""
        return "stay" if in_session else "exit"

    def remaining(self, now: float, heard_at: float) -> float:
        """Seconds until the session must end; <= 0: end it now. ``heard_at``: the last
        authenticated request on the status port (a runtime following this worker)."""
        return max(self.gone_at, heard_at) + self.bound_s - now

    def adopted(self, heard_at: float) -> bool:
        """A runtime has followed this worker since its own died."""
        return heard_at > self.gone_at
