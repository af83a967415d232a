"""The process backend's state file: the workers one runtime instance runs, for the next.

A worker in a session outlives a crashed ``serve`` (``agent/orphan.py``), but it is no
longer anyone's child: the next runtime cannot find it in its own process tree. So each
runtime keeps ``<state_dir>/<pid>-<start time>.json``, one file per *instance*, rewritten
(atomically) whenever a worker starts or ends. A file per instance, not one shared file,
because two runtimes may run at once (a rolling restart): each writes only its own, and
a starting runtime reads only the files of instances that are gone, so it never takes a
worker from a runtime that is alive. The pid and its start time name the instance: a pid
reused by another process is not mistaken for it.

The file holds each worker's status token (a runtime may start with a new admin token and
still reach the workers it adopts), so it is the runtime's alone: the directory 0700 and
the file 0600, owned by the runtime's user, which no worker has (each runs as a uid of its
own). The directory is ``runtime.state_dir``: one per deployment, so two deployments on a
host never adopt each other's workers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from runtime.backends.adoption import WorkerRecord, runtime_gone

logger = logging.getLogger("autonomite.process")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()  # pids and start times name a process only within one boot


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None if there is none (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


class InstanceState:
    """This runtime's state file, and the files dead instances left."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.directory = directory
        self.path = directory / f"{os.getpid()}-{start_time(os.getpid())}.json"
        self._records: dict[str, WorkerRecord] = {}
        self._lock = threading.Lock()  # one writer at a time: starts and exits come from many threads

    def add(self, record: WorkerRecord) -> None:
        with self._lock:
            self._records[record.worker_id] = record
            self._write()

    def remove(self, worker_id: str) -> None:
        with self._lock:
            if self._records.pop(worker_id, None) is not None:
                self._write()

    def close(self) -> None:
        """At a clean stop: the file goes once no worker it names is left."""
        with self._lock:
            if not self._records:
                self.path.unlink(missing_ok=True)

    def left_by_the_dead(self) -> Iterator[tuple[Path, list[WorkerRecord]]]:
        """Each file of an instance that is gone, with its workers, locked while the caller
        handles it (two runtimes starting at once take each file once); removed afterwards."""
        for path in sorted(self.directory.glob("*.json")):
            pid, _, started = path.stem.partition("-")
            if path == self.path or not pid.isdigit() or not started.isdigit():
                continue
            if not runtime_gone(int(started), start_time(int(pid))):
                continue  # a runtime that is alive (draining beside us): its workers are its own
            path.with_suffix(".tmp").unlink(missing_ok=True)  # a write its crash cut short
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                if not isinstance(e, FileNotFoundError):
                    logger.warning("state file %s unreadable (%s); ignored", path, e.strerror)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:  # another runtime took it meanwhile
                    continue
                try:
                    yield path, self._read(path, fd)
                finally:  # handled, or failed to be: never read again (a bad file must not stop every start)
                    path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    @staticmethod
    def _read(path: Path, fd: int) -> list[WorkerRecord]:
        """A bad file or record is skipped with a warning: it must not stop this runtime."""
        try:
            data = json.loads(os.pread(fd, 1 << 22, 0))
            entries = data["workers"]
            if data.get("boot") != BOOT_ID:  # before a reboot: its pids now name other processes
                logger.info("state file %s is from before this host's last boot; nothing in it runs", path)
                return []
            if not isinstance(entries, list):
                raise TypeError("workers is not a list")
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("state file %s unreadable (%s); ignored", path, type(e).__name__)
            return []
        records = []
        for entry in entries:
            try:
                records.append(WorkerRecord.from_json(entry))
            except (KeyError, TypeError, ValueError) as e:
                logger.warning("state file %s: a bad worker record (%s); ignored", path, type(e).__name__)
        return records

    def _write(self) -> None:
        """Best effort: a runtime that cannot write it runs on; only an adoption after a
        crash of it would miss workers (each still ends by itself, agent/orphan.py)."""
        try:
            self._write_file()
        except OSError as e:
            logger.error("cannot write the state file %s: %s (a runtime after a crash of this one would not "
                         "adopt the sessions in progress)", self.path, e.strerror)

    def _write_file(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps({"boot": BOOT_ID, "workers": [r.to_json() for r in self._records.values()]}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
