"""Saving a finished container worker's log: best effort, bounded, never in the way.

Why a module of its own: a container's log lives in the engine only as long as the
container (or the Swarm service) does, so the docker and swarm backends read it and write
it to ``<log_dir>/<client>/<worker>.log`` just before they remove the worker. Both reads
and writes can hang or fail: ``docker service logs`` on a manager never answers for a task
on a node it cannot reach, and a full or read-only log directory refuses the write. A worker
whose log cannot be saved must still end and be removed, or it keeps its pool slot (and its
container) for as long as the trouble lasts.

So each save runs on a daemon thread of its own (a read that hangs there holds nothing but
that thread), the caller waits for it at most ``wait_s`` and then goes on whatever
happened, and at most ``max_in_flight`` saves are under way at once: past that (many hung
reads, say a partitioned node's workers) a log is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from runtime.backends.base import short_error

logger = logging.getLogger("autonomite.logs")

WAIT_S = 5.0  # the most a worker's removal waits for its log
MAX_IN_FLIGHT = 8  # saves still under way (hung) before new ones are skipped


class WorkerLogs:
    def __init__(self, log_dir: Path, wait_s: float = WAIT_S, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.log_dir = log_dir
        self.wait_s = wait_s
        self._max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._in_flight = 0

    def path(self, client_id: str, worker_id: str) -> Path:
        return self.log_dir / client_id / f"{worker_id}.log"

    def save(self, client_id: str, worker_id: str, read: Callable[[], bytes]) -> bool:
        """Write what ``read()`` returns to the worker's log file, waiting at most ``wait_s``.
        True if it was written by then; any failure is logged, never raised."""
        with self._lock:
            if self._in_flight >= self._max_in_flight:
                logger.warning("log of worker %s not saved: %d saves are still under way", worker_id, self._in_flight)
                return False
            self._in_flight += 1
        finished, written = threading.Event(), threading.Event()
        path = self.path(client_id, worker_id)

        def run() -> None:
            try:
                data = read()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                written.set()
            except Exception as e:  # noqa: BLE001 - best effort: any failure only costs the log
                logger.warning("log of worker %s not saved: %s", worker_id, short_error(e))
                with contextlib.suppress(OSError):  # a log file is whole or absent (a full disk cuts it short)
                    path.unlink(missing_ok=True)
            finally:
                with self._lock:
                    self._in_flight -= 1
                finished.set()

        threading.Thread(target=run, name=f"log-{worker_id}", daemon=True).start()
        if not finished.wait(self.wait_s):
            logger.warning("log of worker %s not saved within %g s; going on without it", worker_id, self.wait_s)
        return written.is_set()

    def tail(self, client_id: str, worker_id: str, lines: int) -> str:
        """The last ``lines`` of a saved log, '' if there is none (or it cannot be read)."""
        try:
            return "\n".join(self.path(client_id, worker_id).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
