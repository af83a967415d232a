"""Room join to the agent's first reply, on the offline providers, through real LiveKit.

    .venv/bin/python bench/agent_reply.py [--sessions 20]

Each session: trigger over HTTP, then the end user (livekit rtc SDK) joins with the
returned token. Measured from the moment the user's ``connect()`` returns:
- greeting: until the agent's first words (its greeting) arrive on ``lk.transcription``;
- reply: from sending a chat message on ``lk.chat`` until the agent's answer arrives
  (RAG on, over a 1,000-passage corpus of the client's own documents).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from livekit import rtc

from bench.trigger_latency import machine
from runtime.dev.chat import agent_replies
from runtime.dev.devserver import LiveKitServer
from tests.support import Client, LiveKitProject, Serve, wait_until, write_config


async def one_session(url: str, token: str) -> tuple[float, float]:
    room = rtc.Room()
    replies = agent_replies(room)
    await room.connect(url, token)
    joined = time.perf_counter()
    try:
        greeted, _ = await asyncio.wait_for(replies.get(), 30)
        sent = time.perf_counter()
        await room.local_participant.send_text("What does the warranty cover?", topic="lk.chat")
        answered, _ = await asyncio.wait_for(replies.get(), 30)
    finally:
        await room.disconnect()
    return greeted - joined, answered - sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-reply-"))
    docs = work / "docs"
    docs.mkdir()
    (docs / "kb.txt").write_text("\n\n".join(
        f"Passage {i}: the warranty for product {i} covers parts and labour for {i % 7 + 1} years." for i in range(1000)
    ))
    secret = "bench-" + uuid.uuid4().hex
    server = LiveKitServer({"benchkey": secret}).start()
    project = LiveKitProject(server, "benchkey", secret)
    agent = {"name": "support", "system_prompt": "You are the support agent.", "enable_rag": True}
    client = Client("bench", project, min_idle=1, max_size=2, agents=[agent], knowledge_dir=str(docs))
    env = write_config(work / "clients.yaml", [client])
    serve = Serve(work / "clients.yaml", env, work / "serve.log").start()
    greet, reply = [], []
    try:
        for i in range(args.sessions):
            wait_until(lambda: serve.pool("bench")["idle"] >= 1, 60, "an idle worker")
            r = serve.trigger(client, f"reply-{uuid.uuid4().hex[:8]}", context={"name": "Dana"})
            g, a = asyncio.run(one_session(r.body["livekit_url"], r.body["participant_token"]))
            greet.append(g * 1000)
            reply.append(a * 1000)
            print(f"session {i + 1:2d}: greeting {greet[-1]:6.0f} ms   reply {reply[-1]:6.0f} ms", flush=True)
    finally:
        serve.stop()
        server.stop()
    print()
    print(f"machine: {machine()}")
    print("| measure | p50 (ms) | p95 (ms) | max (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in (("join to greeting", greet), ("message to reply (RAG, 1k passages)", reply)):
        p95 = statistics.quantiles(values, n=100)[94]
        print(f"| {name} | {statistics.median(values):.0f} | {p95:.0f} | {max(values):.0f} |")


if __name__ == "__main__":
    main()
