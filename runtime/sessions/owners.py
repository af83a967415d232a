"""Which ``serve`` owns which open sessions, and which one sends what the state file holds.

Two ``serve`` share one state directory during a rolling restart: the new one starts while
the old one drains its calls. So a start must not close the sessions the old one is still
serving, only those of a runtime that is gone; and only one of them may deliver webhooks
and ship records from the shared file (two would send the same event at once, or ship an
older version of a row after a newer one).

Both are told by ``flock``: the kernel releases a lock when its process dies, however it
dies, so "can the lock be taken" is "is its holder gone", with no pid reuse to fool it.
Each ``serve`` holds ``<state_dir>/sessions.owners/<owner>.lock`` for its whole life and
writes its owner id on every record it touches; the sender lock
(``<state_dir>/sessions.sender.lock``) is taken by a thread that waits for it, and whoever
holds it runs the deliverer and the shipper.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("autonomite.sessions")


class Owner:
    """This process's claim on the sessions it writes."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "sessions.owners"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._fd = os.open(self.dir / f"{self.id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else has it

    def alive(self, owner: str | None) -> bool:
        """Whether the runtime that wrote ``owner`` still runs (this one does)."""
        if owner == self.id:
            return True
        if not owner or "/" in owner or owner.startswith("."):
            return False
        path = self.dir / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases the lock if we took it
        path.unlink(missing_ok=True)  # its holder is gone: its file goes too
        return False

    def release(self) -> None:
        (self.dir / f"{self.id}.lock").unlink(missing_ok=True)
        os.close(self._fd)


def when_sole_sender(state_dir: Path, start: Callable[[], None]) -> threading.Thread:
    """Run ``start()`` once this process holds the sender lock: at once, or when the runtime
    that holds it (the one a rolling restart replaces) exits. The lock is held until this
    process exits."""

    def wait_then_start() -> None:
        fd = os.open(state_dir / "sessions.sender.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another runtime sends the session webhooks and records; taking over when it exits")
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks this thread only
            logger.info("the other runtime exited: sending session webhooks and records from here")
        start()  # fd stays open: the lock lasts as long as the process

    thread = threading.Thread(target=wait_then_start, name="session-sender", daemon=True)
    thread.start()
    return thread
