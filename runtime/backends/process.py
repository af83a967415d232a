"""The process backend (the embedded default): each worker is a subprocess of this runtime.

A worker's environment is built from an allow-list plus its own client's credentials, so it
never inherits another client's secrets from ours. Workers get PR_SET_PDEATHSIG: if the
runtime dies, even by SIGKILL, the kernel sends them SIGTERM, so none outlives ``serve``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from runtime._proc import die_with_parent
from runtime.backends.base import BackendError, WorkerHandle, WorkerSpec

_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")

class ProcessBackend:
    name = "process"

    def __init__(self, log_dir: Path, python: str = sys.executable) -> None:
        self._log_dir = log_dir
        self._python = python
        self._lock = threading.Lock()
        self._procs: dict[str, tuple[WorkerHandle, subprocess.Popen]] = {}

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
        env.update(spec.env)
        if spec.knowledge_dir:
            env["AUTONOMITE_KNOWLEDGE_DIR"] = spec.knowledge_dir
        log_path = self._log_path(spec.client_id, spec.worker_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
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
        return code

    def logs(self, handle: WorkerHandle, tail: int = 100) -> str:
        path = self._log_path(handle.client_id, handle.worker_id)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def close(self) -> None:
        pass

    def _log_path(self, client_id: str, worker_id: str) -> Path:
        return self._log_dir / client_id / f"{worker_id}.log"

    def _proc(self, handle: WorkerHandle) -> subprocess.Popen | None:
        with self._lock:
            entry = self._procs.get(handle.worker_id)
        return entry[1] if entry else None
