"""``autonomite chat``: be the end user of one session, from a terminal.

It triggers a session through the gateway, joins the room with the returned token and
relays lines: what you type goes to the agent on ``lk.chat``, what the agent says comes
back on ``lk.transcription``. Text only, as the offline demo agent speaks.
"""

from __future__ import annotations

import asyncio
import json
import sys
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


async def _relay(url: str, token: str) -> None:
    room = rtc.Room()

    def on_text(reader: rtc.TextStreamReader, identity: str) -> None:
        async def show() -> None:
            text = await reader.read_all()
            if text.strip():
                print(f"\nagent> {text}\nyou> ", end="", flush=True)

        asyncio.ensure_future(show())

    room.register_text_stream_handler("lk.transcription", on_text)
    await room.connect(url, token)
    print("joined; type a message and press Enter (Ctrl-D to leave)\nyou> ", end="", flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip():
                await room.local_participant.send_text(line.strip(), topic="lk.chat")
    finally:
        await room.disconnect()


def chat(gateway: str, token: str, client_id: str, agent: str, room: str, context: dict | None) -> int:
    session = trigger(gateway, token, {"client_id": client_id, "agent": agent, "room_name": room, "context": context})
    print(f"session: worker {session['worker_id']} in room {session['room_name']}")
    asyncio.run(_relay(session["livekit_url"], session["participant_token"]))
    return 0
