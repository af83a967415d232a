"""Which of a worker's status answers its pool hears: a pure decision, no I/O, no clock.

``actors/_watch.py`` follows each worker's status port for its whole life (a long poll)
and feeds every answer, or the lack of one, to a :class:`Debounce`; what it returns is
what the pool is told. Why:

- Nothing before the worker first registered: until then it is starting, which the pool
  knows already (and a start timeout covers a worker that never registers).
- A change is told at once; the same status again every ``resend_s`` even unchanged: a
  pool that set a worker aside on a failed claim learns that it is fine again.
- A worker that registered once and then answers none of ``silent_probes`` probes in a
  row counts as unregistered and starting (hung, or gone): never idle, so never leased.

Owned by the one thread that follows the worker. Unit-tested: tests/unit/test_status_debounce.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.contract import Milestones, ReportedState, Status

Seen = tuple[bool, ReportedState, str | None, Milestones]  # registered, state, lease id, session
SILENT: Status = {"registered": False, "state": "starting"}  # what a silent worker counts as


@dataclass
class Debounce:
    resend_s: float
    silent_probes: int
    last: Seen | None = None
    sent_at: float | None = None
    silent: int = 0
    ever_registered: bool = False

    def heard(self, status: Status | None, now: float) -> Seen | None:
        """``status``: the worker's answer, None if it gave none. Returns what to tell the
        pool, or None. ``last`` is then what the worker was last known to say."""
        self.silent = 0 if status is not None else self.silent + 1
        if status is None and self.ever_registered and self.silent >= self.silent_probes:
            status = SILENT
        if status is None:
            return None
        session = Milestones(bool(status.get("in_room")), bool(status.get("user_joined")), status.get("end_cause"))
        seen: Seen = (bool(status.get("registered")), status.get("state", "starting"), status.get("lease_id"), session)
        due = seen != self.last or self.sent_at is None or now - self.sent_at >= self.resend_s
        tell = (self.ever_registered or seen[0]) and due
        if tell:
            self.sent_at = now
        self.last, self.ever_registered = seen, self.ever_registered or seen[0]
        return seen if tell else None
