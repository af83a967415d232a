"""A cgroup per worker, with its pool's memory and pids limits: cgroup v1 or v2.

The runtime makes one parent cgroup for itself under its own (so a supervisor's limits
on ``serve`` still bound every worker), one child per worker, and removes both when done.
The worker writes itself into its cgroup before it runs any code of its own
(``agent/sandbox.py``), so its limits hold from its first allocation on.

- **v1** (this machine): a directory under each controller's hierarchy, ``memory/`` and
  ``pids/``: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap is
  accounted, so a worker cannot swap past its limit), ``pids.max``. The kernel's OOM killer
  then picks its victim inside the cgroup only: a worker past its limit dies alone, and
  ``memory.oom_control`` counts it (``oom_kill``).
- **v2**: one directory, ``memory.max``, ``memory.swap.max`` 0, ``memory.oom.group`` 1
  (the worker's helper processes go with it), ``pids.max``; ``memory.events`` counts the
  kill. The parent must have the controllers in ``cgroup.subtree_control``, which v2 only
  allows in a cgroup without processes: the runtime moves itself into a leaf of its own
  cgroup first (as a systemd service with ``Delegate=yes`` may).

Writing needs root or a delegated subtree; :meth:`CgroupTree.open` says why not otherwise.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids")


class CgroupError(Exception):
    """No usable cgroup tree; the message says why (logged once by the runtime)."""


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and ``""`` for the v2 (unified) one."""
    found = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            found[c] = path
    return found


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass(frozen=True)
class WorkerCgroup:
    """One worker's cgroup: one directory per v1 controller, or one on v2."""

    dirs: tuple[Path, ...]
    version: int

    @property
    def procs_files(self) -> tuple[str, ...]:
        return tuple(str(d / "cgroup.procs") for d in self.dirs)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return found

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this cgroup (it stays readable until removed)."""
        name, key = ("memory.oom_control", "oom_kill") if self.version == 1 else ("memory.events", "oom_kill")
        for d in self.dirs:
            try:
                for line in (d / name).read_text().splitlines():
                    k, _, v = line.partition(" ")
                    if k == key:
                        return int(v)
            except OSError:
                continue
        return 0

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill whatever is left in it (a worker's helpers), then remove it. False if it stayed."""
        deadline = time.monotonic() + timeout
        if self.version == 2:
            try:
                _write(self.dirs[0] / "cgroup.kill", "1")
            except OSError:
                pass
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:  # v1 has no cgroup.kill: a fork bomb is bounded by pids.max
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        removed = True
        for d in self.dirs:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY for a moment after the last process exits
                    if time.monotonic() > deadline:
                        removed = False
                        break
                    time.sleep(0.01)
        return removed


def sweep_stale(where: Path, name: str) -> None:
    """Remove what a runtime killed by SIGKILL left: ``<prefix>-<pid>-...`` parents whose pid
    is gone, with their workers' empty cgroups. A cgroup with processes is a worker in a
    session that outlived its runtime (``agent/orphan.py``): it stays, for the runtime that
    adopts the worker to remove when the session ends (``runtime/backends/process.py``)."""
    prefix = name.split("-", 1)[0] + "-"
    for stale in where.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or stale.name == name or Path(f"/proc/{pid}").exists():
            continue
        version = 2 if (stale / "cgroup.controllers").exists() else 1
        for child in stale.glob("worker-*"):
            if not any(_running(p) for p in WorkerCgroup((child,), version).pids()):  # zombies are on their way out
                WorkerCgroup((child,), version).remove(timeout=1.0)
        try:
            stale.rmdir()  # fails while a worker's cgroup is left in it
        except OSError:
            pass


def _running(pid: int) -> bool:
    """Alive, and not a zombie (a zombie stays listed in its cgroup until it is reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class CgroupTree:
    """The runtime's parent cgroup(s); :meth:`create` makes a worker's."""

    def __init__(self, parents: tuple[Path, ...], version: int) -> None:
        self.parents = parents
        self.version = version

    @classmethod
    def open(cls, name: str) -> CgroupTree:
        """Make ``name`` under this process's own cgroup(s); CgroupError if this host cannot."""
        own = _own_paths()
        if (ROOT / "cgroup.controllers").exists():  # pure v2
            return cls._open_v2(ROOT / own.get("", "/").lstrip("/"), name)
        missing = [c for c in V1_CONTROLLERS if c not in own or not (ROOT / c).is_dir()]
        if missing:
            raise CgroupError(f"no cgroup v1 hierarchy for {', '.join(missing)} and no cgroup v2")
        parents = []
        try:
            for c in V1_CONTROLLERS:
                sweep_stale(ROOT / c / own[c].lstrip("/"), name)
                parent = ROOT / c / own[c].lstrip("/") / name
                parent.mkdir(exist_ok=True)
                parents.append(parent)
        except OSError as e:
            for p in parents:
                p.rmdir()
            raise CgroupError(f"cannot create {e.filename}: {e.strerror} (cgroups not delegated to this user)") from None
        return cls(tuple(parents), 1)

    @classmethod
    def _open_v2(cls, own: Path, name: str) -> CgroupTree:
        sweep_stale(own, name)
        try:
            enabled = (own / "cgroup.subtree_control").read_text().split()
            if not {"memory", "pids"} <= set(enabled):
                if (own / "cgroup.procs").read_text().split():  # no internal processes on v2
                    leaf = own / f"{name}-runtime"
                    leaf.mkdir(exist_ok=True)
                    _write(leaf / "cgroup.procs", "0")
                _write(own / "cgroup.subtree_control", "+memory +pids")
            parent = own / name
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", "+memory +pids")
        except OSError as e:
            raise CgroupError(f"cgroup v2 at {own}: {e.strerror} (delegate it with its memory and pids "
                              f"controllers)") from None
        return cls((parent,), 2)

    def create(self, worker_id: str, memory_mb: int, pids: int) -> WorkerCgroup:
        limit = memory_mb * 1024 * 1024
        dirs = tuple(p / f"worker-{worker_id}" for p in self.parents)
        for d in dirs:
            d.mkdir()
        cgroup = WorkerCgroup(dirs, self.version)
        try:
            if self.version == 1:
                memory, pid_dir = dirs
                _write(memory / "memory.limit_in_bytes", str(limit))
                if (memory / "memory.memsw.limit_in_bytes").exists():
                    _write(memory / "memory.memsw.limit_in_bytes", str(limit))
                _write(pid_dir / "pids.max", str(pids))
            else:
                (d,) = dirs
                _write(d / "memory.max", str(limit))
                for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    if (d / name).exists():
                        _write(d / name, value)
                _write(d / "pids.max", str(pids))
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def close(self) -> None:
        """Remove the parents (their workers' cgroups are gone by now)."""
        for p in self.parents:
            for child in p.glob("worker-*"):
                WorkerCgroup((child,), self.version).remove(timeout=1.0)
            try:
                p.rmdir()
            except OSError:
                pass
