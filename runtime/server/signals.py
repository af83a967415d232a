"""``serve``'s signals: SIGTERM and SIGINT stop it, SIGHUP reloads, and none ever kills it.

Why not asyncio's ``add_signal_handler``: when asyncio lets go of a signal (its removal,
or the loop's close) it restores the default action, which for SIGTERM and SIGHUP is
death. A signal in that moment, or later while the runtime stops its workers, or while
Python exits, killed ``serve``: workers stranded mid-stop, or a clean stop turned into a
death by signal. Here the handlers are Python's own, swapped in one call each, and the
default action never comes back: once everything is stopped, the signals are ignored.

How a signal reaches the loop (as asyncio does it): the interpreter's C handler, on any
thread, writes the signal's number to a wakeup socket; the loop reads it there and calls
``on_signal`` on its own thread. The Python-level handler has nothing to do until the
way down, when it only logs.

Threads: created, swapped and closed on the main thread (``signal`` requires it); the
reader runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger("autonomite")

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_HANDLED_NUMBERS = frozenset(int(sig) for sig in HANDLED)


class Signals:
    def __init__(self) -> None:
        """From here a signal is held for the loop (a SIGTERM while the runtime starts is
        acted on as soon as the loop runs), never the default action."""
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, _held)

    def attach(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[signal.Signals], None]) -> None:
        """Deliver each signal to ``on_signal`` on ``loop``, those held meanwhile first."""

        def read() -> None:
            try:
                data = self._reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            for number in data:  # any signal with a Python handler writes here: only ours count
                if number not in _HANDLED_NUMBERS:
                    continue
                try:
                    on_signal(signal.Signals(number))
                except Exception:  # a bug: logged; the signals after it still count
                    logger.exception("handling %s", signal.Signals(number).name)

        self._loop = loop
        loop.add_reader(self._reader.fileno(), read)

    def way_down(self) -> None:
        """The way down has begun: from now on a signal is logged, and changes nothing."""
        for sig in HANDLED:
            signal.signal(sig, _on_the_way_down)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._reader.fileno())
        self._loop = None

    def close(self) -> None:
        """Everything is stopped: a signal now could only turn an exit 0 into a death by
        signal (Python restores the default action of its handlers as it exits, not of an
        ignored signal)."""
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        self._reader.close()
        self._writer.close()


def _held(signum: int, frame: FrameType | None) -> None:
    """Nothing: the C handler has written the signal's number for the loop."""


def _on_the_way_down(signum: int, frame: FrameType | None) -> None:
    # Runs on the main thread wherever it was (a join in the runtime's stop): nothing may
    # escape into that, not even a log write the signal interrupted.
    try:
        logger.warning("%s on the way down: ignored; serve stops as soon as it can", signal.Signals(signum).name)
    except Exception:  # noqa: BLE001
        pass
