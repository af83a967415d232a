"""The gateway's loop stays responsive while an actor is slow."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pykka

from runtime.http import bridge


@dataclass(frozen=True)
class SlowQuestion:
    release: threading.Event
    reply: object


class SlowActor(pykka.ThreadingActor):
    def on_receive(self, message):
        message.release.wait(10)  # blocks this actor's thread, as slow I/O would
        message.reply("answer")


def test_the_loop_keeps_running_while_an_actor_is_slow():
    actor = SlowActor.start()
    release = threading.Event()

    async def scenario() -> tuple[int, str]:
        pending = asyncio.create_task(bridge.ask(lambda reply: actor.tell(SlowQuestion(release, reply)), 10))
        ticks = 0
        while ticks < 200:  # the loop serves other work while the actor is still blocked
            await asyncio.sleep(0)
            ticks += 1
        assert not pending.done() and not release.is_set()
        release.set()
        return ticks, await pending

    try:
        ticks, answer = asyncio.run(scenario())
    finally:
        actor.stop()
    assert ticks == 200 and answer == "answer"


def test_a_reply_after_the_timeout_is_dropped_quietly():
    actor = SlowActor.start()
    release = threading.Event()

    async def scenario() -> None:
        try:
            await bridge.ask(lambda reply: actor.tell(SlowQuestion(release, reply)), 0.05)
        except TimeoutError:
            release.set()
        else:
            raise AssertionError("expected a timeout")

    try:
        asyncio.run(scenario())  # the loop is closed before the actor answers
        answered = threading.Event()
        actor.tell(SlowQuestion(release, lambda _: answered.set()))
        assert answered.wait(5), "the late reply must not have killed the actor"
    finally:
        actor.stop()
