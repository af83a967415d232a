"""The runtime's end of worker isolation on the process backend: what each worker becomes.

``agent/sandbox.py`` is what a worker does to itself after the fork; this module decides
it: a uid and gid of the worker's own from ``runtime.isolation.uids``, a cgroup with its
pool's limits (``runtime/cgroups.py``), namespaces if asked. It also hardens the runtime's
own side: ``serve`` not dumpable, the secrets it read from its environment out of
``os.environ``, its files (config, client cache, logs, knowledge) closed to workers.

Not root: ``serve`` cannot give workers uids of their own, so they keep its uid; it still
applies what needs no privilege (no_new_privs, non-dumpable, seccomp, cgroups where
delegated), says in one log line what it could not, and refuses to start when
``runtime.isolation.required`` is set.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.sandbox import Identity
from runtime._proc import prctl
from runtime.cgroups import CgroupError, CgroupTree, WorkerCgroup
from runtime.settings import IsolationSettings

logger = logging.getLogger("autonomite.isolation")

_PR_SET_DUMPABLE = 4
_instances = itertools.count()
# What giving each worker a uid of its own takes, when serve is not root: these, in its
# effective set and as ambient capabilities (so the zygote keeps them across its exec).
CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
UID_CAPS = (1 << CAP_SETGID) | (1 << CAP_SETUID) | (1 << CAP_SETPCAP)
CAP_SYS_ADMIN = 21  # namespaces and mounts


def may_change_uids() -> bool:
    if os.geteuid() == 0:
        return True
    caps = _capabilities()
    return caps["CapEff"] & UID_CAPS == UID_CAPS and caps["CapAmb"] & UID_CAPS == UID_CAPS


def may_make_namespaces() -> bool:
    caps = _capabilities()
    return bool(caps["CapEff"] & caps["CapAmb" if os.geteuid() else "CapEff"] & (1 << CAP_SYS_ADMIN))


def _capabilities() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v, 16) for k, _, v in (line.partition(":") for line in f) if k in ("CapEff", "CapAmb")}


class IsolationUnavailable(Exception):
    """``runtime.isolation.required`` is set and this host cannot give it all."""


@dataclass(frozen=True)
class Placement:
    """One worker's identity and the cgroup made for it (None where not applied)."""

    identity: Identity
    cgroup: WorkerCgroup | None


class UidPool:
    """Per-worker uids, handed out round robin, so a uid is reused as late as possible
    (files a worker left in a shared directory such as /tmp wait a long time for the next
    holder; with namespaces each worker has a private /tmp anyway)."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self._next = 0
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            for _ in range(self.count):
                uid = self.first + self._next
                self._next = (self._next + 1) % self.count
                if uid not in self._used:
                    self._used.add(uid)
                    return uid
        raise RuntimeError(f"all {self.count} worker uids are in use")

    def hold(self, uid: int) -> None:
        """A uid an adopted worker runs as: not handed out until it is given back."""
        with self._lock:
            self._used.add(uid)

    def give_back(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)


class Isolation:
    """What this host allows, found once at start; then one :class:`Placement` per worker."""

    def __init__(self, settings: IsolationSettings, name: str = "") -> None:
        # <pid>-<n>: two backends in one process (a benchmark) must not share a parent cgroup.
        name = name or f"autonomite-{os.getpid()}-{next(_instances)}"
        self.settings = settings
        self.root = may_change_uids()
        self.uids = UidPool(settings.uids.first, settings.uids.count) if self.root else None
        self.cgroups: CgroupTree | None = None
        missing = []
        if not self.root:
            missing.append(f"a uid per worker (serve runs as uid {os.geteuid()}, without root or CAP_SETUID, "
                           "CAP_SETGID and CAP_SETPCAP: workers share its uid)")
        try:
            self.cgroups = CgroupTree.open(name)
        except CgroupError as e:
            missing.append(f"cgroups ({e})")
        self.namespaces = settings.namespaces and may_make_namespaces()
        if settings.namespaces and not self.namespaces:
            missing.append("pid and mount namespaces (need root or CAP_SYS_ADMIN)")
        self.missing = missing
        if missing and settings.required:
            self.close()
            raise IsolationUnavailable("runtime.isolation.required is set, but this host cannot give workers: "
                                       + "; ".join(missing))
        applied = ["no_new_privs", "non-dumpable", "seccomp"] + ["a uid per worker"] * bool(self.uids) \
            + ["cgroups"] * bool(self.cgroups) + ["pid and mount namespaces"] * self.namespaces
        if missing:
            logger.warning("isolation: applied %s; could not apply: %s", ", ".join(applied), "; ".join(missing))
        else:
            logger.info("isolation: workers get %s", ", ".join(applied))

    def place(self, worker_id: str, memory_mb: int, pids: int) -> Placement:
        uid = self.uids.take() if self.uids is not None else None
        cgroup = None
        try:
            if self.cgroups is not None:
                cgroup = self.cgroups.create(worker_id, memory_mb, pids)
        except OSError:
            if self.uids is not None and uid is not None:
                self.uids.give_back(uid)
            raise
        identity = Identity(uid=uid, gid=uid, cgroup_procs=cgroup.procs_files if cgroup else (),
                            mount_namespace=self.namespaces)
        return Placement(identity, cgroup)

    def adopt(self, uid: int | None, cgroup: WorkerCgroup | None) -> Placement:
        """The placement of a worker a dead runtime started: its uid is held from now on, and
        its cgroup removed with it (by :meth:`release`), as for a worker of our own."""
        if uid is not None and self.uids is not None:
            self.uids.hold(uid)
        return Placement(Identity(uid=uid, gid=uid, cgroup_procs=cgroup.procs_files if cgroup else ()), cgroup)

    def release(self, placement: Placement) -> bool:
        """After the worker exited: True if the OOM killer took a process of it. Its cgroup
        (and anything still in it) goes first, so its uid is free of processes when reused."""
        oom = False
        if placement.cgroup is not None:
            oom = placement.cgroup.oom_kills() > 0
            if not placement.cgroup.remove():
                logger.error("worker cgroup %s could not be removed", placement.cgroup.dirs[0])
        if self.uids is not None and placement.identity.uid is not None:
            self.uids.give_back(placement.identity.uid)
        return oom

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()


# -- the runtime's own side -------------------------------------------------------------------


def harden_runtime() -> None:
    """``serve`` (and so the zygote it forks before exec) is not dumpable: no process of
    another uid, nor of its own without CAP_SYS_PTRACE, reads its memory or environ."""
    prctl(_PR_SET_DUMPABLE, 0)


def take_secrets_from_environ(names: Iterable[str]) -> dict[str, str]:
    """Move the variables a config file reads (``${VAR}``) out of ``os.environ`` (and so out
    of every child's environment) into a mapping only the runtime holds, for reloads."""
    taken = {}
    for name in names:
        if name in os.environ:
            taken[name] = os.environ.pop(name)
    return taken


def close_to_others(path: Path, recursive: bool = False) -> list[Path]:
    """Remove every permission of "others" (a worker is neither owner nor group) from
    ``path`` (and below it); return the paths that had any. Missing paths are skipped."""
    changed = []
    paths = [path]
    if recursive and path.is_dir():
        paths += sorted(path.rglob("*"))
    for p in paths:
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not mode & 0o007:
            continue
        os.chmod(p, stat.S_IMODE(mode) & ~0o007)
        changed.append(p)
    return changed
