"""``autonomite chat``: be the end user of one session, from a terminal.

It triggers a session through the gateway, joins the room with the returned token and
relays lines: what you type goes to the agent on ``lk.chat``, what the agent says comes
back on ``lk.transcription``.

With ``--voice`` each line is spoken into the room instead (espeak-ng, on a microphone
track), and the agent's audio is transcribed (pocketsphinx) and printed as ``heard>``,
beside its own transcript (``agent>``): the voice path, visible from a terminal. The
recognizer's vocabulary is the client's texts (``--words``, e.g. its knowledge_dir) and
common words; words outside it are not heard.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livekit import rtc

if TYPE_CHECKING:
    from runtime.dev.voice_io import Ears, Mouth

AGENT_WAIT_S = 30.0  # the leased agent joins within moments of the trigger's answer
LEAVE_TIMEOUT_S = 10.0  # closing the audio streams and leaving the room


def trigger(gateway: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{gateway.rstrip('/')}/api/v1/trigger",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            answer: dict[str, Any] = json.loads(r.read())
            return answer
    except urllib.error.HTTPError as e:
        raise SystemExit(f"trigger refused: {e.code} {e.read().decode(errors='replace')}") from None


def agent_replies(room: rtc.Room) -> asyncio.Queue[tuple[float, str]]:
    """Subscribe to what agents say in ``room``: each whole reply, as (perf_counter, text).

    Call before ``connect()``, so the greeting is not missed. Agents write on the
    ``lk.transcription`` text stream, as livekit-agents' room I/O does; our agents' identities
    start with ``agent-``.
    """
    replies: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    reading: set[asyncio.Task[Any]] = set()

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


async def _relay(url: str, token: str, voice_texts: list[str] | None) -> None:
    room = rtc.Room()
    replies = agent_replies(room)
    printers = [asyncio.create_task(_print(replies, "agent"))]
    mouth = ears = None
    if voice_texts is not None:
        from agent.offline_voice import Recognizer
        from runtime.dev.voice_io import Ears, Mouth

        ears, mouth = Ears(room, Recognizer(voice_texts)), Mouth()
        printers.append(asyncio.create_task(_print(ears.heard, "heard")))
    agent_here = asyncio.Event()  # LiveKit delivers a line only to who is in the room already

    def arrived(p: rtc.RemoteParticipant) -> None:
        if p.identity.startswith("agent-"):
            agent_here.set()

    room.on("participant_connected", arrived)
    await room.connect(url, token)
    if any(identity.startswith("agent-") for identity in room.remote_participants):
        agent_here.set()
    if mouth is not None:
        await mouth.publish(room)
    print("joined; type a message and press Enter (Ctrl-D to leave)\nyou> ", end="", flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if not line.strip():
                continue
            try:  # a line typed before the agent joined waits for it
                await asyncio.wait_for(agent_here.wait(), AGENT_WAIT_S)
            except TimeoutError:
                print(f"\nno agent in the room after {AGENT_WAIT_S:g} s; line not sent\nyou> ", end="", flush=True)
                continue
            if mouth is not None:
                await mouth.say(line.strip())
            else:
                await room.local_participant.send_text(line.strip(), topic="lk.chat")
    finally:
        for task in printers:
            task.cancel()
        # Leaving must not hang on a stream or a room that no longer answers; the room is
        # left even if closing the audio gave up.
        if ears is not None and mouth is not None:
            await _bounded(_close_audio(ears, mouth), "closing the audio")
        await _bounded(room.disconnect(), "leaving the room")


async def _close_audio(ears: Ears, mouth: Mouth) -> None:
    await ears.close()
    await mouth.close()


async def _bounded(step: Awaitable[None], what: str) -> None:
    try:
        await asyncio.wait_for(step, LEAVE_TIMEOUT_S)
    except TimeoutError:
        print(f"\n{what} took over {LEAVE_TIMEOUT_S:g} s; gave up waiting", file=sys.stderr)


async def _print(queue: asyncio.Queue[Any], label: str) -> None:
    while True:
        item = await queue.get()
        text = item[1] if isinstance(item, tuple) else item.text
        print(f"\n{label}> {text}\nyou> ", end="", flush=True)


def _texts(path: Path | None) -> list[str]:
    if path is None:
        return []
    if not path.exists():
        raise SystemExit(f"--words {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md")) if path.is_dir() else [path]
    return [f.read_text(errors="replace") for f in files]


def chat(gateway: str, token: str, client_id: str, agent: str, room: str, context: dict[str, Any] | None,
         voice: bool = False, voice_words: Path | None = None) -> int:
    session = trigger(gateway, token, {"client_id": client_id, "agent": agent, "room_name": room, "context": context})
    print(f"session: worker {session['worker_id']} in room {session['room_name']}")
    asyncio.run(_relay(session["livekit_url"], session["participant_token"], _texts(voice_words) if voice else None))
    return 0
