"""The process backend (the embedded default): each worker is a child process of this runtime.

A worker is forked by the zygote (``runtime/backends/zygote.py``), already holding the
imported livekit-agents, in a fraction of a second; when the zygote is down (booting,
restarting, failed) or turned off (``runtime.workers.zygote: false``), it is started
plainly with ``python -m agent``, which costs seconds of imports. Either way it runs the
same worker program and gets a pid, an exit code and a log file.

A worker's environment is built from an allow-list plus its own client's credentials, so it
never inherits another client's secrets from ours. Workers get PR_SET_PDEATHSIG: if the
runtime dies, even by SIGKILL, the kernel sends them SIGTERM, so none outlives ``serve``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Protocol

from runtime._proc import die_with_parent
from runtime.backends.base import BackendError, WorkerHandle, WorkerSpec
from runtime.backends.zygote import Zygote

_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
_ZYGOTE_ENV = {
    # numpy's OpenBLAS starts a thread pool when imported; the zygote must hold one thread.
    "OPENBLAS_NUM_THREADS": "1",
    # The zygote runs livekit-agents' own warm-up (``livekit.agents.ipc._preload``: the rtc
    # library, the SSL context, the HTTP client), without its ~260 MB of local VAD and
    # end-of-turn models, which only voice input needs.
    "LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE": "0",
}


class _Child(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class ProcessBackend:
    name = "process"

    def __init__(self, log_dir: Path, python: str = sys.executable, zygote: bool = True) -> None:
        self._log_dir = log_dir
        self._python = python
        self._lock = threading.Lock()
        self._procs: dict[str, tuple[WorkerHandle, _Child]] = {}
        self._sessions: deque[int] = deque(maxlen=4096)  # forked workers' session ids, for the sweep
        self.zygote = Zygote(log_dir / "zygote.log", python, {**_allowed_env(), **_ZYGOTE_ENV}) if zygote else None

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        env = {**_allowed_env(), **spec.env}
        if spec.knowledge_dir:
            env["AUTONOMITE_KNOWLEDGE_DIR"] = spec.knowledge_dir
        log_path = self._log_path(spec.client_id, spec.worker_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc: _Child | None = self.zygote.fork(env, log) if self.zygote else None
            forked = proc is not None
            if proc is None:
                try:
                    proc = subprocess.Popen(
                        [self._python, "-m", "agent"],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                    )
                except OSError as e:
                    raise BackendError(f"cannot start worker {spec.worker_id}: {e.strerror}") from None
        handle = WorkerHandle.from_labels(spec.labels, ref=str(proc.pid))
        with self._lock:
            self._procs[spec.worker_id] = (handle, proc)
            if forked:
                self._sessions.append(proc.pid)  # it leads a session of its own
        return handle

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
                for h, p in self._procs.values()
                if p.poll() is None and (client_id is None or h.client_id == client_id)
            ]

    def wait(self, handle: WorkerHandle) -> int:
        proc = self._proc(handle)
        if proc is None:
            return -1
        code = proc.wait()
        with self._lock:
            self._procs.pop(handle.worker_id, None)
        self._reap_orphans()
        return code

    def logs(self, handle: WorkerHandle, tail: int = 100) -> str:
        path = self._log_path(handle.client_id, handle.worker_id)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()

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
            tracked = {p.pid for _, p in self._procs.values()}
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
