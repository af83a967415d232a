"""Messages sent to actors later: one thread keeps every timer of the runtime.

Actors never sleep: a pool's backoff, a lease's deadline, the scaler's tick and a
trigger's answer timeout are each a message told when it is due. A ``threading.Timer``
per timer was a thread per trigger: under a retry storm (a thousand refusals a second,
each with a 2 s deadline) that was two thousand threads alive at once, and starting them
was most of what the refusal path cost. Here one daemon thread sleeps until the earliest
due time in a heap.

A cancelled timer stays in the heap until it is due and is then dropped; ``cancel`` and
``is_alive`` are safe from any thread (they read and set one flag).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Any

import pykka

logger = logging.getLogger("autonomite.timers")


class Timer:
    __slots__ = ("actor", "cancelled", "due", "fired", "message")

    def __init__(self, due: float, actor: pykka.ActorRef[Any], message: object) -> None:
        self.due, self.actor, self.message = due, actor, message
        self.cancelled = self.fired = False

    def cancel(self) -> None:
        self.cancelled = True

    def is_alive(self) -> bool:
        """Not fired yet and not cancelled."""
        return not (self.cancelled or self.fired)


class _Clock:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # ties fire in the order they were set
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def after(self, seconds: float, actor: pykka.ActorRef[Any], message: object) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, seconds), actor, message)
        with self._changed:
            heapq.heappush(self._heap, (timer.due, next(self._order), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
                self._thread.start()
            if self._heap[0][2] is timer:  # due before all the others: the thread sleeps too long
                self._changed.notify()
        return timer

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._changed.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.fired = True
                try:
                    timer.actor.tell(timer.message)
                except pykka.ActorDeadError:
                    pass  # the actor stopped meanwhile: nobody is waiting for this
                except Exception:  # every actor's timers hang on this thread: it must not die
                    logger.exception("telling a timer's message failed")


_clock = _Clock()


def after(seconds: float, actor: pykka.ActorRef[Any], message: object) -> Timer:
    """Tell ``message`` to ``actor`` once, ``seconds`` from now."""
    return _clock.after(seconds, actor, message)
