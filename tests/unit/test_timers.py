"""The runtime's one timer thread: messages told when due, in order, and cancellable."""

from __future__ import annotations

import threading

import pykka

from actors import timers
from tests.support import wait_until


class Inbox(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[object] = []

    def on_receive(self, message: object) -> object:
        if message == "read":
            return list(self.got)
        self.got.append(message)
        return None


def test_timers_fire_in_due_order_a_cancelled_one_never_and_all_on_one_thread():
    inbox = Inbox.start()
    try:
        before = threading.active_count()
        late = timers.after(0.3, inbox, "late")
        cancelled = timers.after(0.1, inbox, "cancelled")
        for i in range(200):  # a storm of deadlines costs no thread each
            timers.after(0.2, inbox, i)
        timers.after(0.0, inbox, "now")
        cancelled.cancel()
        assert threading.active_count() <= before + 1  # the timer thread itself, once
        wait_until(lambda: "late" in inbox.ask("read"), 5, "the last timer")
        got = inbox.ask("read")
        assert got == ["now", *range(200), "late"] and "cancelled" not in got
        assert not late.is_alive() and not cancelled.is_alive()
    finally:
        inbox.stop()


def test_a_timer_for_a_stopped_actor_is_dropped_and_the_clock_goes_on():
    gone, inbox = Inbox.start(), Inbox.start()
    try:
        timers.after(0.05, gone, "lost")
        gone.stop()
        timers.after(0.1, inbox, "after")
        wait_until(lambda: inbox.ask("read") == ["after"], 5, "the next timer")
    finally:
        inbox.stop()
