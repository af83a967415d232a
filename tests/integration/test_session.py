"""The agent's session in the room, as a caller lives it: reconnecting, the agent's own
reconnect, and speaking before the greeting. Real livekit-servers, a real ``autonomite
serve``; the caller is a real LiveKit participant."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from livekit import rtc

from runtime.chat import agent_replies
from tests.support import ChatProcess, Client, metric_value, wait_until

SUPPORT = {"name": "support", "system_prompt": "You are Acme's support agent."}
GRACE_S = 4.0  # rejoin_grace_s in these tests: short, so waiting it out is quick


def worker_log(serve, client: str, worker_id: str) -> str:
    path = Path(serve.config).parent / "workers" / client / f"{worker_id}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def leased(serve, client: str, worker_id: str) -> bool:
    return worker_id in {w["id"] for w in serve.pool(client)["workers"] if w["state"] == "leased"}


def test_a_caller_who_rejoins_within_the_grace_keeps_the_session_and_one_who_does_not_ends_it(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2, agents=[SUPPORT])
    serve = run_serve([alpha], workers={"rejoin_grace_s": GRACE_S})
    r = serve.trigger(alpha, "room-rejoin", context={"name": "Dana"})
    assert r.status == 200, r.body
    url, token, worker_id = r.body["livekit_url"], r.body["participant_token"], r.body["worker_id"]

    async def drop_and_rejoin() -> tuple[str, float]:
        first = rtc.Room()
        replies = agent_replies(first)
        await first.connect(url, token)
        await asyncio.wait_for(replies.get(), 30)  # the greeting
        # The caller's connection is replaced, as a client that lost its own does: it joins
        # again under the same identity, and LiveKit drops the old participant.
        again = rtc.Room()
        replies = agent_replies(again)
        await again.connect(url, token)
        rejoined = time.monotonic()
        try:
            await asyncio.to_thread(wait_until, lambda: "an end user is back" in worker_log(serve, "alpha", worker_id)
                                    or not leased(serve, "alpha", worker_id), 30, "the agent to see the rejoin")
            # The input under test is time: the grace runs out with the caller back.
            await asyncio.sleep(max(0.0, rejoined + GRACE_S + 1.0 - time.monotonic()))
            await again.local_participant.send_text("what is my name?", topic="lk.chat")
            answer = (await asyncio.wait_for(replies.get(), 30))[1]
        finally:
            await again.disconnect()
            left = time.monotonic()
            await first.disconnect()
        return answer, left

    answer, left = asyncio.run(drop_and_rejoin())
    assert answer == "Dana, you said: what is my name?"
    # The caller left for good: the session ends, once the grace has run out.
    wait_until(lambda: worker_id not in {w["id"] for w in serve.pool("alpha")["workers"]}, 60, "the worker to exit")
    assert time.monotonic() - left >= GRACE_S
    log = worker_log(serve, "alpha", worker_id)
    assert f"none came back within {GRACE_S:g} s" in log, log[-3000:]
    assert metric_value(serve.metrics(), "autonomite_worker_exits_total", client="alpha", cause="session_end") == 1


def test_a_first_message_before_the_greeting_gets_one_greeting_then_one_answer(run_serve, lk_a):
    """``autonomite chat``, the question typed as soon as it has joined. The stand-in LLM
    takes 1.5 s to its first word, as a cloud LLM may: the question surely comes first."""
    slow = {**SUPPORT, "llm": {"provider": "offline", "first_token_s": 1.5}}
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1, agents=[slow])
    serve = run_serve([alpha])
    chat = ChatProcess(serve, alpha, "--agent", "support", "--room", "room-early", "--context", '{"name": "Dana"}')
    try:
        wait_until(lambda: chat.printed("joined"), 60, "chat to join")
        chat.type("what is my name?")
        assert not chat.printed("agent>"), "the question must come before the greeting"
        wait_until(lambda: chat.printed("agent> Dana, you said: what is my name?"), 60, "the answer")
        # One more question: anything owed to the first one would come before its answer.
        chat.type("and my plan?")
        wait_until(lambda: chat.printed("agent> Dana, you said: and my plan?"), 60, "the second answer")
        said = [line.strip() for line in chat.lines if line.startswith("agent> ")]
        assert said == ["agent> Hello Dana, I'm the assistant for Alpha Inc. How can I help you today?",
                        "agent> Dana, you said: what is my name?",
                        "agent> Dana, you said: and my plan?"], said
        assert chat.leave() == 0
    finally:
        chat.close()
