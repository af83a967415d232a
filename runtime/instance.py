"""Which runtime owns a worker: an instance id, labelled on every container and service.

Why: several runtimes may share one Docker engine or one swarm (two operators' runtimes,
or the old and the new ``serve`` of a rolling restart), and each must adopt, remove and
stop only its own workers. A client id cannot tell them apart: two runtimes may both
serve a client ``alpha``.

How the id is made and kept: ``<state_dir>/instance-<id>`` is an empty file whose name is
the id (8 random hex characters), and a running ``serve`` holds an exclusive ``flock`` on
it for its whole life. The kernel drops the lock when the process ends, however it ends.

- At start, ``serve`` takes over a file whose lock nobody holds: a runtime that died (a
  crash, SIGKILL, a host restart) left it, with its workers still running, and the new one
  adopts them by taking its id. Several such files: the oldest is taken, the others wait
  for the next start.
- If every file is locked (the old ``serve`` of a rolling restart is still draining), it
  makes a new id. So two live runtimes never share an id, even on one state directory.
- A clean stop that leaves no worker of its own behind deletes its file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger("autonomite.instance")

PREFIX = "instance-"


class Instance:
    """This runtime's id, and the lock that says it is alive."""

    def __init__(self, instance_id: str, path: Path, fd: int, new: bool) -> None:
        self.id, self.path, self._fd = instance_id, path, fd
        self.new = new  # False: taken over from a runtime that is gone, whose workers may run on

    @classmethod
    def claim(cls, state_dir: Path) -> Instance:
        """Take over the id of a runtime that is gone, or make a new one."""
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)  # the runtime's alone (runtime.state_dir)
        for path in sorted(state_dir.glob(f"{PREFIX}*"), key=_age):
            fd = _lock(path)
            if fd is not None:
                instance = cls(path.name[len(PREFIX):], path, fd, new=False)
                logger.info("runtime instance %s: taken over from a runtime that is gone (its workers are adopted)",
                            instance.id)
                return instance
        for _ in range(100):  # a new id is taken only if no file has its name: a clash is rare
            instance_id = secrets.token_hex(4)
            path = state_dir / f"{PREFIX}{instance_id}"
            # Locked before it has its name, so no other start can take it for a dead one's.
            partial = state_dir / f".{PREFIX}{instance_id}.new"
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.link(partial, path)  # fails if the name exists: never two runtimes on one id
            except FileExistsError:
                os.close(fd)
                continue
            finally:
                partial.unlink(missing_ok=True)
            logger.info("runtime instance %s: new", instance_id)
            return cls(instance_id, path, fd, new=True)
        raise OSError(f"{state_dir}: no free instance id after 100 tries")

    def release(self, forget: bool) -> None:
        """Give the id up; ``forget``: delete it too (nothing of this runtime is left to adopt)."""
        if self._fd < 0:
            return
        if forget:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # the lock goes with the descriptor
        self._fd = -1


def _lock(path: Path) -> int | None:
    """A descriptor holding ``path``'s lock, or None if a live runtime holds it (or the file
    went away meanwhile: a runtime that stopped cleanly deleted it)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:  # still the file that has this name
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _age(path: Path) -> float:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mtime
    return float("inf")
