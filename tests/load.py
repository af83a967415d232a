"""Async tools for the fault suite: triggers as a caller sends them, end users as LiveKit
sees them, and the check that every 200 put an agent in its room."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
from livekit import api, rtc

from tests.support import Client, Serve


@dataclass
class Outcome:
    room: str
    status: int
    body: dict
    retry_after: str | None
    agent_joined: bool | None = None  # checked for every 200


@dataclass
class Ledger:
    """Everything the suite sent and got back, to check at the end."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def problems(self) -> list[str]:
        """Each way the runtime broke its promises, in words; empty when it kept them all."""
        found = []
        for o in self.outcomes:
            if o.status == 200 and not o.agent_joined:
                found.append(f"200 without an agent in {o.room}: {o.body.get('worker_id')}")
            elif o.status == 503 and not (o.retry_after and o.body.get("error")):
                found.append(f"503 without Retry-After or error code for {o.room}: {o.body}")
            elif o.status not in (200, 503):
                found.append(f"unexpected {o.status} for {o.room}: {o.body}")
        workers = [o.body["worker_id"] for o in self.ok]
        twice = {w for w in workers if workers.count(w) > 1}
        if twice:
            found.append(f"workers leased twice: {sorted(twice)}")
        return found


async def trigger(http: aiohttp.ClientSession, serve: Serve, client: Client, room: str, **extra) -> Outcome:
    body = {"client_id": client.id, "agent": "support", "room_name": room, **extra}
    headers = {"Authorization": f"Bearer {client.token}"}
    url = f"http://127.0.0.1:{serve.port}/api/v1/trigger"
    async with http.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as r:
        payload = json.loads(await r.read() or b"{}")
        return Outcome(room, r.status, payload, r.headers.get("Retry-After"))


async def agent_in_room(lk: api.LiveKitAPI, room: str, worker_id: str, timeout: float = 20.0,
                        interval: float = 0.1) -> bool:
    """Whether the leased worker's agent became an active participant of the room in time."""
    identity = f"agent-{worker_id}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
        if rooms.rooms:
            people = (await lk.room.list_participants(api.ListParticipantsRequest(room=room))).participants
            if any(p.identity == identity and p.state == api.ParticipantInfo.State.ACTIVE for p in people):
                return True
        await asyncio.sleep(interval)
    return False


async def join_as_user(url: str, token: str, stay_s: float) -> None:
    """An end user joins, stays a while, and leaves."""
    room = rtc.Room()
    await room.connect(url, token)
    try:
        await asyncio.sleep(stay_s)
    finally:
        await room.disconnect()


def lk_api(client: Client) -> api.LiveKitAPI:
    return api.LiveKitAPI(client.project.url.replace("ws://", "http://"), client.project.key, client.project.secret)
