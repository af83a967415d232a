"""``autonomite chat``: be the end user of one session, from a terminal.

It triggers a session through the gateway, joins the room with the returned token and
relays lines: what you type goes to the agent on ``lk.chat``, what the agent says comes
back on ``lk.transcription``. Text only, as the offline demo agent speaks.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

from livekit import rtc


def trigger(gateway: str, token: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{gateway.rstrip('/')}/api/v1/trigger",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"trigger refused: {e.code} {e.read().decode(errors='replace')}") from None


def agent_replies(room: rtc.Room) -> "asyncio.Queue[tuple[float, str]]":
    """Subscribe to what agents say in ``room``: each whole reply, as (perf_counter, text).

    Call before ``connect()``, so the greeting is not missed. Agents write on the
    ``lk.transcription`` text stream, as livekit-agents' room I/O does; our agents' identities
    start with ``agent-``.
    """
    replies: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    reading: set[asyncio.Task] = set()

    async def read(reader: rtc.TextStreamReader) -> None:
        text = await reader.read_all()
        if text.strip():
            await replies.put((time.perf_counter(), text))

    def on_text(reader: rtc.TextStreamReader, identity: str) -> None:
        if identity.startswith("agent-"):
            task = asyncio.ensure_future(read(reader))
            reading.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(reading.discard)

    room.register_text_stream_handler("lk.transcription", on_text)
    return replies


async def _relay(url: str, token: str) -> None:
    room = rtc.Room()
    replies = agent_replies(room)

    async def show() -> None:
        while True:
            _, text = await replies.get()
            print(f"\nagent> {text}\nyou> ", end="", flush=True)

    await room.connect(url, token)
    shower = asyncio.create_task(show())
    print("joined; type a message and press Enter (Ctrl-D to leave)\nyou> ", end="", flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip():
                await room.local_participant.send_text(line.strip(), topic="lk.chat")
    finally:
        shower.cancel()
        await room.disconnect()


def chat(gateway: str, token: str, client_id: str, agent: str, room: str, context: dict | None) -> int:
    session = trigger(gateway, token, {"client_id": client_id, "agent": agent, "room_name": room, "context": context})
    print(f"session: worker {session['worker_id']} in room {session['room_name']}")
    asyncio.run(_relay(session["livekit_url"], session["participant_token"]))
    return 0
