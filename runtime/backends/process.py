"""The process backend (the embedded default): each worker is a child process of this runtime.

A worker is forked by the zygote (``runtime/backends/zygote.py``), already holding the
imported livekit-agents, in a fraction of a second; when the zygote is down (booting,
restarting, failed) or turned off (``runtime.workers.zygote: false``), it is started
plainly with ``python -m agent``, which costs seconds of imports. Either way it runs the
same worker program and gets a pid, an exit code and a log file.

A worker's environment is built from an allow-list plus its own client's credentials, so it
never inherits another client's secrets from ours. Workers get PR_SET_PDEATHSIG: if the
runtime dies, even by SIGKILL, the kernel sends them SIGTERM, so none outlives ``serve``.

With ``runtime.isolation`` (on by default) each worker also takes an identity of its own
before it runs any worker code (``runtime/isolation.py`` decides it, ``agent/sandbox.py``
applies it): a uid, a cgroup with its pool's limits, seccomp, optionally namespaces. Its
files are closed to it: the log directory is the runtime's alone (0700; a worker writes
its log through the descriptor the runtime opened for it), and it never reads its
client's knowledge directory: the runtime reads the documents and hands them over in a
memfd, so the directory can be closed to every worker.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Protocol

from agent.rag import documents_memfd
from runtime._proc import die_with_parent
from runtime.backends.base import BackendError, WorkerHandle, WorkerSpec
from runtime.backends.zygote import Zygote, open_private_log, private_dir
from runtime.isolation import Isolation, Placement, close_to_others
from runtime.settings import IsolationSettings

logger = logging.getLogger("autonomite.process")

_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
_ZYGOTE_ENV = {
    # numpy's OpenBLAS starts a thread pool when imported; the zygote must hold one thread.
    "OPENBLAS_NUM_THREADS": "1",
    # The zygote runs livekit-agents' own warm-up (``livekit.agents.ipc._preload``: the rtc
    # library, the SSL context, the HTTP client), without its ~260 MB of local VAD and
    # end-of-turn models, which only voice input needs.
    "LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE": "0",
}
# A plain start imports before it takes its identity, single-threaded like the zygote.
_PLAIN_ISOLATED_ENV = {"OPENBLAS_NUM_THREADS": "1"}


class _Child(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class ProcessBackend:
    name = "process"

    def __init__(self, log_dir: Path, python: str = sys.executable, zygote: bool = True,
                 isolation: IsolationSettings | None = IsolationSettings()) -> None:
        self._log_dir = log_dir
        self._python = python
        self._lock = threading.Lock()
        self._procs: dict[str, tuple[WorkerHandle, _Child, Placement | None]] = {}
        self._exit_causes: dict[str, str] = {}
        self._sessions: deque[int] = deque(maxlen=4096)  # forked workers' session ids, for the sweep
        private_dir(log_dir)
        self.isolation = Isolation(isolation) if isolation is not None and isolation.enabled else None
        self.zygote = Zygote(log_dir / "zygote.log", python, {**_allowed_env(), **_ZYGOTE_ENV}) if zygote else None

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        env = {**_allowed_env(), **spec.env}
        documents = None
        if spec.knowledge_dir and self.isolation is not None:
            documents = self._documents(Path(spec.knowledge_dir))
        elif spec.knowledge_dir:
            env["AUTONOMITE_KNOWLEDGE_DIR"] = spec.knowledge_dir
        log_path = self._log_path(spec.client_id, spec.worker_id)
        private_dir(log_path.parent)
        placement = None
        try:
            if self.isolation is not None:
                placement = self.isolation.place(spec.worker_id, spec.memory_mb, spec.pids)
            with open_private_log(log_path) as log:
                proc, forked = self._fork(env, log, placement, documents), True
                if proc is None:
                    proc, forked = self._plain_start(spec, env, log, placement, documents), False
        except BaseException:
            if placement is not None:
                self.isolation.release(placement)
            raise
        finally:
            if documents is not None:
                os.close(documents)
        handle = WorkerHandle.from_labels(spec.labels, ref=str(proc.pid))
        with self._lock:
            self._procs[spec.worker_id] = (handle, proc, placement)
            if forked:
                self._sessions.append(proc.pid)  # it leads a session of its own
        return handle

    def _fork(self, env: dict, log: IO[bytes], placement: Placement | None, documents: int | None) -> _Child | None:
        if self.zygote is None:
            return None
        identity = placement.identity if placement is not None else None
        return self.zygote.fork(env, log, identity.to_json() if identity else None, documents,
                                pid_namespace=bool(identity and identity.mount_namespace))

    def _plain_start(self, spec: WorkerSpec, env: dict, log: IO[bytes], placement: Placement | None,
                     documents: int | None) -> _Child:
        """``python -m agent``: it imports as root, then takes the identity (agent/__main__.py).
        No namespaces here: a pid namespace needs the zygote's middle process."""
        if placement is not None:
            identity = placement.identity.to_json() | {"mount_namespace": False}
            env = {**env, **_PLAIN_ISOLATED_ENV, "AUTONOMITE_IDENTITY": json.dumps(identity)}
        if documents is not None:
            env["AUTONOMITE_KNOWLEDGE_FD"] = str(documents)
        try:
            return subprocess.Popen(
                [self._python, "-m", "agent"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[documents] if documents is not None else [],
                preexec_fn=die_with_parent,
            )
        except OSError as e:
            raise BackendError(f"cannot start worker {spec.worker_id}: {e.strerror}") from None

    def _documents(self, path: Path) -> int:
        """The client's documents, read by the runtime; the directory closed to every worker."""
        try:
            changed = close_to_others(path, recursive=True)
        except OSError as e:
            logger.warning("cannot close knowledge directory %s to other users: %s", path, e.strerror)
        else:
            if changed:
                logger.info("knowledge directory %s: closed %d paths to other users (workers read it "
                            "through the runtime only)", path, len(changed))
        return documents_memfd(path)

    def stop(self, handle: WorkerHandle, timeout: float = 10.0) -> None:
        proc = self._proc(handle)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def list(self, client_id: str | None = None) -> list[WorkerHandle]:
        with self._lock:
            return [
                h
                for h, p, _ in self._procs.values()
                if p.poll() is None and (client_id is None or h.client_id == client_id)
            ]

    def wait(self, handle: WorkerHandle) -> int:
        proc = self._proc(handle)
        if proc is None:
            return -1
        code = proc.wait()
        with self._lock:
            entry = self._procs.pop(handle.worker_id, None)
        if entry is not None and entry[2] is not None and self.isolation.release(entry[2]):
            self._exit_causes[handle.worker_id] = "oom"
        self._reap_orphans()
        return code

    def exit_cause(self, handle: WorkerHandle) -> str | None:
        """After :meth:`wait`: ``oom`` if the kernel killed it for its memory limit, else None."""
        return self._exit_causes.pop(handle.worker_id, None)

    def logs(self, handle: WorkerHandle, tail: int = 100) -> str:
        path = self._log_path(handle.client_id, handle.worker_id)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()
        if self.isolation is not None:
            self.isolation.close()

    def _log_path(self, client_id: str, worker_id: str) -> Path:
        return self._log_dir / client_id / f"{worker_id}.log"

    def _proc(self, handle: WorkerHandle) -> _Child | None:
        with self._lock:
            entry = self._procs.get(handle.worker_id)
        return entry[1] if entry else None

    def _reap_orphans(self) -> None:
        """Reap what a forked worker left behind when it died (a helper process of its own):
        as the runtime is their subreaper, they are re-parented to us and would stay zombies.
        Only zombies in a forked worker's session are reaped, never a child someone else waits on."""
        me, sessions = os.getpid(), set(self._sessions)
        with self._lock:
            tracked = {p.pid for _, p, _ in self._procs.values()}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in tracked:
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session ...
            if fields[0] == "Z" and int(fields[1]) == me and int(fields[3]) in sessions:
                try:
                    os.waitpid(int(entry.name), os.WNOHANG)
                except ChildProcessError:
                    pass


def _allowed_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
