"""Handing a leased worker its session: what makes a 200 mean an agent in the room.

A pool's idle state is as old as its last probe, and LiveKit drops a dispatch that no
registered worker can take. So after a lease the dispatcher, on the LiveKit adapter's
loop (never in its mailbox):

1. **claims** the worker on its status port with the lease id. The worker says yes only
   if it is idle and registered with LiveKit *now*; the claim is recorded in the worker,
   so it outlives a crashed pool actor;
2. **creates** the LiveKit dispatch, whose metadata carries the lease id (the worker
   accepts no other job);
3. **waits** until the worker accepted that job (a long poll on its status port), for at
   most ``accept_timeout_s``. A dispatch not accepted by then is deleted, so it cannot
   reach the worker later.

The outcome comes back to the DispatchActor as a message; it answers 200 only on
``accepted``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from agent.contract import StatusAddress
from runtime.errors import describe
from runtime.livekit.client import LiveKitClient
from runtime.settings import LiveKitSettings

logger = logging.getLogger("autonomite.dispatch")

Outcome = Literal["accepted", "unregistered", "claimed", "livekit_error", "not_accepted"]

CALL_TIMEOUT_S = 2.0  # a status-port call on loopback; LiveKit API calls get twice that


@dataclass(frozen=True)
class Handoff:
    outcome: Outcome
    dispatch_id: str | None = None
    error: str | None = None  # for livekit_error: a short, secret-free description
    released: bool = False  # for livekit_error: the worker gave its claim back (it took no job)


class WorkerControl:
    """Calls to workers' status ports, on the LiveKit adapter's loop (one HTTP session)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def call(
        self, method: str, worker: StatusAddress, path: str, timeout: float = CALL_TIMEOUT_S, **params: str
    ) -> dict[str, Any] | None:
        """The worker's JSON answer (on 200 or 409), or None if it did not answer."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(method, worker.url(path), params=params, headers=worker.headers(),
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status not in (200, 409):  # a refusal that is not the worker's own answer
                    return None
                body = await r.json()
                return {**body, "ok": r.status == 200}
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def hand_off(
    livekit: LiveKitClient,
    control: WorkerControl,
    project: LiveKitSettings,
    *,
    worker: StatusAddress,
    lease_id: str,
    worker_id: str,
    agent_name: str,
    room: str,
    metadata: str,
    accept_timeout_s: float,
) -> Handoff:
    claim = await control.call("POST", worker, "/claim", lease_id=lease_id, worker_id=worker_id)
    if claim is None or not claim["ok"]:
        taken = claim is not None and claim.get("state") in ("claimed", "busy")
        return Handoff("claimed" if taken else "unregistered")
    try:
        dispatch_id = await asyncio.wait_for(
            livekit.create_dispatch(project, agent_name, room, metadata), 2 * CALL_TIMEOUT_S
        )
    except Exception as e:  # noqa: BLE001 - any LiveKit failure is a 502, with a safe text
        # LiveKit may have created the dispatch all the same: only a worker that gives its
        # claim back (it took no job) may serve the next lease.
        released = await control.call("POST", worker, "/release", lease_id=lease_id)
        return Handoff("livekit_error", error=describe(e), released=bool(released and released["ok"]))
    answer = await control.call(
        "GET", worker, "/job", timeout=accept_timeout_s + CALL_TIMEOUT_S, lease_id=lease_id, wait=str(accept_timeout_s)
    )
    if answer is not None and answer["ok"]:
        return Handoff("accepted", dispatch_id)
    try:  # so it can never reach the worker (or any other) later
        await asyncio.wait_for(livekit.delete_dispatch(project, dispatch_id, room), 2 * CALL_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        logger.error("deleting unaccepted dispatch %s: %s", dispatch_id, describe(e))
    return Handoff("not_accepted", dispatch_id)

