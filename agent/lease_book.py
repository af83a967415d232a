"""A worker's end of the lease protocol, and what it says about itself on its status port.

Owned by the worker's main event loop; served by ``agent/status_server.py``, read by the
runtime through ``agent/contract.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.contract import EndCause, ReportedState, Status, WorkerConfig

CLAIM_TIMEOUT_S = 30.0  # claimed and no job by then: the runtime lost track of it; exit
FLAG_CHECK_S = 0.5  # how often a status long poll looks at the LiveKit connection flag


class LeaseBook:
    """What this worker says about itself on its status port, and its end of the lease protocol.

    ``starting -> idle -> claimed -> busy -> draining``. The runtime *claims* an idle worker
    (with a lease id) before it creates the LiveKit dispatch, and the worker accepts only a
    job whose metadata carries that lease id. So the lease is recorded here, in the worker,
    and outlives a crashed pool actor: a restarted pool sees ``claimed`` or ``busy`` and
    never leases the worker again. Owned by the worker's main event loop.
    """

    def __init__(self, config: WorkerConfig, is_connected: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.changed = asyncio.Event()  # set on every state change: wakes the status long polls
        self._state: ReportedState = "starting"
        self.lease_id: str | None = None
        self.accepted_job: str | None = None
        self.job_accepted = asyncio.Event()
        self.assignment_failed = False
        self.claimed_at = 0.0
        self.end_session: Callable[[str, bool, bool], None] | None = None  # set once a job runs
        self.is_connected = is_connected  # set to the LiveKit connection once the server exists
        self.runtime_gone = False  # the runtime that started it died: never claimed again
        self.heard_at = time.monotonic()  # the last authenticated status call: a runtime follows us
        # The session's milestones, for its record (the runtime stamps the time it hears them).
        self.in_room = False
        self.user_joined = False
        self.end_cause: EndCause | None = None

    @property
    def state(self) -> ReportedState:
        return self._state

    @state.setter
    def state(self, value: ReportedState) -> None:
        self._state = value
        self.changed.set()

    def etag(self) -> str:
        """Names what the runtime follows: a status long poll answers when it changes."""
        return (f"{self.state}:{int(self.registered)}:{self.lease_id or ''}:{int(self.in_room)}"
                f"{int(self.user_joined)}:{self.end_cause or ''}")

    def joined(self) -> None:
        self.in_room = True
        self.changed.set()

    def user_came(self) -> None:
        self.user_joined = True
        self.changed.set()

    def ended(self, cause: EndCause) -> None:
        """The first cause is the one: an end that follows an end (a drain after the caller
        left) does not rename it."""
        if self.end_cause is None:
            self.end_cause = cause
            self.changed.set()

    async def changed_from(self, etag: str, wait: float) -> None:
        """Return once the status differs from ``etag``, or after ``wait`` seconds. State
        changes wake it at once; a lost LiveKit connection (a flag, no event) within
        ``FLAG_CHECK_S``: each idle worker wakes twice a second for that, and no more."""
        deadline = time.monotonic() + wait
        while self.etag() == etag and (remaining := deadline - time.monotonic()) > 0:
            self.changed.clear()
            try:
                async with asyncio.timeout(min(remaining, FLAG_CHECK_S)):
                    await self.changed.wait()
            except TimeoutError:
                pass

    @property
    def registered(self) -> bool:
        """Registered with LiveKit *now*: false from the moment its connection drops."""
        return self.state != "starting" and self.is_connected()

    def claim(self, lease_id: str, worker_id: str) -> bool:
        """``worker_id``: the runtime means this worker (a status port reused by another
        worker must not be claimed by mistake)."""
        if (self.state != "idle" or not self.registered or worker_id != self.config.worker_id or not lease_id
                or self.runtime_gone):
            return False
        self.state, self.lease_id = "claimed", lease_id
        self.claimed_at = time.monotonic()
        return True

    def release(self, lease_id: str) -> bool:
        """The dispatch failed before any job: serve the next lease instead."""
        if self.state != "claimed" or self.lease_id != lease_id or self.accepted_job:
            return False
        self.state, self.lease_id = "idle", None
        return True

    def accept(self, job_id: str, lease_id: str | None) -> bool:
        """One job, and only the one dispatched for this worker's current lease. The runtime
        hears of it (``job_accepted``) only once LiveKit assigned it: see ``assigned``."""
        if self.state != "claimed" or self.accepted_job is not None or lease_id != self.lease_id:
            return False
        self.state, self.accepted_job = "busy", job_id
        return True

    def assigned(self, ok: bool) -> None:
        """LiveKit assigned the accepted job (or did not: then /job answers no)."""
        self.assignment_failed = not ok
        self.job_accepted.set()

    def claim_expired(self, now: float) -> bool:
        return self.state == "claimed" and now - self.claimed_at > CLAIM_TIMEOUT_S

    def load(self) -> float:
        """What LiveKit is told: free until the job is taken, full afterwards. Not the
        machine's CPU, which LiveKit compares with its 0.7 threshold and then drops our
        dispatch; and not full while merely claimed, or a status report between the claim
        and the job request would turn that very job away."""
        return 1.0 if self.state in ("busy", "draining") else 0.0

    def as_json(self) -> Status:
        return {
            "worker_id": self.config.worker_id,
            "client_id": self.config.client_id,
            "agent_name": self.config.agent_name,
            "state": self.state,
            "registered": self.registered,
            "lease_id": self.lease_id,
            "job_id": self.accepted_job,
            "in_room": self.in_room,
            "user_joined": self.user_joined,
            "end_cause": self.end_cause,
            "etag": self.etag(),
        }
