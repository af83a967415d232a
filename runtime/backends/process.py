"""The process backend (the embedded default): each worker is a child process of this runtime.

A worker is forked by the zygote (``runtime/backends/zygote.py``), already holding the
imported livekit-agents, in a fraction of a second; when the zygote is down (booting,
restarting, failed) or turned off (``runtime.workers.zygote: false``), it is started
plainly with ``python -m agent``, which costs seconds of imports. Either way it runs the
same worker program and gets a pid, an exit code and a log file.

A worker's environment is built from an allow-list plus its own client's credentials, so it
never inherits another client's secrets from ours.

A crash of ``serve`` cuts no call. Each worker holds the read end of a *lifeline*, a pipe
whose write end only this runtime holds: when the runtime dies, even by SIGKILL, the
worker reads end of file (``agent/lifeline.py``). A worker in no session then exits at
once; one in a session goes on. Every worker is recorded in this instance's state file
(``instance_state.py``), and the next runtime adopts the sessions recorded by a dead one
(``adoption.py`` decides): it follows them as leased until they end, then removes what
they leave (cgroup, uid, record), as for its own.

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
import re
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any, Protocol

from agent.contract import Env, StatusAddress, read_status
from agent.rag import documents_memfd
from runtime.backends.adoption import WorkerRecord, verdict
from runtime.backends.base import BackendError, WorkerHandle, WorkerSpec
from runtime.backends.instance_state import InstanceState, start_time
from runtime.backends.zygote import AdoptedChild, Zygote, open_private_log, private_dir
from runtime.cgroups import WorkerCgroup
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
                 isolation: IsolationSettings | None = IsolationSettings(),  # noqa: B008 - immutable
                 state_dir: Path | None = None) -> None:
        self._log_dir = log_dir
        self._python = python
        self._lock = threading.Lock()
        self._procs: dict[str, tuple[WorkerHandle, _Child, Placement | None]] = {}
        self._exit_causes: dict[str, str] = {}
        self._stopped: dict[str, int] = {}  # exit codes of workers stop() saw end, until waited for
        self._sessions: deque[int] = deque(maxlen=4096)  # forked workers' session ids, for the sweep
        private_dir(log_dir)
        # Each worker's lifeline: a pipe per worker, whose write end only this process holds
        # (close-on-exec, never passed on); the worker's read end reads end of file once we
        # are gone. Per worker, so no worker can hold another's open (agent/lifeline.py).
        self._lifelines: dict[str, int] = {}
        self.state = InstanceState(state_dir or log_dir / ".state")  # serve passes runtime.state_dir
        self.isolation = Isolation(isolation) if isolation is not None and isolation.enabled else None
        self.adopted = self._take_over()
        self.zygote = Zygote(log_dir / "zygote.log", python, {**_allowed_env(), **_ZYGOTE_ENV}) if zygote else None

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        env = {**_allowed_env(), **spec.env}
        documents = None
        if spec.knowledge_dir and self.isolation is not None:
            documents = self._documents(Path(spec.knowledge_dir))
        elif spec.knowledge_dir:
            env[Env.KNOWLEDGE_DIR] = spec.knowledge_dir
        log_path = self._log_path(spec.client_id, spec.worker_id)
        private_dir(log_path.parent)
        placement = None
        lifeline, lifeline_end = os.pipe()
        try:
            if self.isolation is not None:
                placement = self.isolation.place(spec.worker_id, spec.memory_mb, spec.pids)
            with open_private_log(log_path) as log:
                proc, forked = self._fork(env, log, lifeline, placement, documents), True
                if proc is None:
                    proc, forked = self._plain_start(spec, env, log, lifeline, placement, documents), False
        except BaseException:
            os.close(lifeline_end)
            if placement is not None and self.isolation is not None:
                self.isolation.release(placement)
            raise
        finally:
            os.close(lifeline)
            if documents is not None:
                os.close(documents)
        handle = WorkerHandle.from_labels(spec.labels, ref=str(proc.pid))
        with self._lock:
            self._procs[spec.worker_id] = (handle, proc, placement)
            self._lifelines[spec.worker_id] = lifeline_end
            if forked:
                self._sessions.append(proc.pid)  # it leads a session of its own
        cgroup = placement.cgroup if placement is not None else None
        self.state.add(WorkerRecord(
            spec.worker_id, spec.client_id, spec.agent_name, spec.status_port, spec.credentials_fp, proc.pid,
            start_time(proc.pid) or 0, spec.env.get(Env.STATUS_TOKEN, ""),
            placement.identity.uid if placement is not None else None,
            tuple(str(d) for d in cgroup.dirs) if cgroup else (), cgroup.version if cgroup else 1,
        ))
        return handle

    def _fork(self, env: dict[str, Any], log: IO[bytes], lifeline: int, placement: Placement | None,
              documents: int | None) -> _Child | None:
        if self.zygote is None:
            return None
        identity = placement.identity if placement is not None else None
        return self.zygote.fork(env, log, lifeline, identity.to_json() if identity else None, documents,
                                pid_namespace=bool(identity and identity.mount_namespace))

    def _plain_start(self, spec: WorkerSpec, env: dict[str, Any], log: IO[bytes], lifeline: int, placement: Placement | None,
                     documents: int | None) -> _Child:
        """``python -m agent``: it imports as root, then takes the identity (agent/__main__.py).
        No namespaces here: a pid namespace needs the zygote's middle process."""
        if placement is not None:
            identity = placement.identity.to_json() | {"mount_namespace": False}
            env = {**env, **_PLAIN_ISOLATED_ENV, Env.IDENTITY: json.dumps(identity)}
        if documents is not None:
            env[Env.KNOWLEDGE_FD] = str(documents)
        env[Env.LIFELINE_FD] = str(lifeline)
        try:
            return subprocess.Popen(
                [self._python, "-m", "agent"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[lifeline, *([documents] if documents is not None else [])],
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
        self._release(handle.worker_id, proc)  # whoever waits on it may be gone (a dead pool)
        with self._lock:
            self._stopped[handle.worker_id] = proc.wait()  # for a wait() that comes after
            while len(self._stopped) > 1024:  # nobody waited for those (bounded)
                self._stopped.pop(next(iter(self._stopped)))

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
            with self._lock:
                return self._stopped.pop(handle.worker_id, -1)
        code = proc.wait()
        self._release(handle.worker_id, proc)
        self._reap_orphans()
        return code

    def _release(self, worker_id: str, proc: _Child) -> None:
        """What an ended worker held: its lifeline, uid and cgroup, and its record. Once:
        both :meth:`wait` and :meth:`stop` call it, whichever comes first does it."""
        with self._lock:
            entry = self._procs.pop(worker_id, None)
            lifeline_end = self._lifelines.pop(worker_id, None)
        if entry is None:
            return
        if lifeline_end is not None:
            os.close(lifeline_end)
        if entry[2] is not None:
            if self.isolation is not None and self.isolation.release(entry[2]):
                self._exit_causes[worker_id] = "oom"
            if isinstance(proc, AdoptedChild):
                self._remove_parents(entry[2].cgroup)
        self.state.remove(worker_id)

    def exit_cause(self, handle: WorkerHandle) -> str | None:
        """After :meth:`wait`: ``oom`` if the kernel killed it for its memory limit, else None."""
        return self._exit_causes.pop(handle.worker_id, None)

    def logs(self, handle: WorkerHandle, tail: int = 100) -> str:
        path = self._log_path(handle.client_id, handle.worker_id)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def warm(self) -> bool:
        """Until the zygote's first boot is over, a worker waits for it: a trigger for a
        client at zero would wait seconds, past ``max_wait_s``."""
        return self.zygote is None or self.zygote.booted

    def close(self) -> None:
        with self._lock:
            lifelines, self._lifelines = list(self._lifelines.values()), {}
        for fd in lifelines:  # a worker still running learns that we are gone (agent/lifeline.py)
            os.close(fd)
        if self.zygote is not None:
            self.zygote.close()
        if self.isolation is not None:
            self.isolation.close()
        self.state.close()

    # -- after a crash: the sessions a dead runtime left ------------------------------------

    def _take_over(self) -> int:
        """Adopt the workers in session that dead runtimes recorded; remove the rest."""
        adopted = 0
        for path, records in self.state.left_by_the_dead():
            for record in records:
                try:
                    adopted += self._take_over_one(record, path.stem)
                except Exception:  # one bad record must not stop this runtime
                    logger.exception("could not take over worker %s left by dead runtime %s", record.worker_id,
                                     path.stem)
        return adopted

    def _take_over_one(self, record: WorkerRecord, instance: str) -> bool:
        child = None
        try:
            child = AdoptedChild(record.pid, lambda: _exit_code_in(self._log_path(record.client_id, record.worker_id)))
        except (ProcessLookupError, OSError):
            pass
        current = start_time(record.pid) if child is not None else None  # after the pidfd: it names this process
        status = None
        if current == record.started:
            address = StatusAddress("127.0.0.1", record.status_port, record.token)
            for _ in range(3):  # a busy worker may answer late; a session is worth the wait
                if (status := read_status(address, timeout=1.0)) is not None:
                    break
        what = verdict(record, current, status)
        cgroup = WorkerCgroup(tuple(Path(d) for d in record.cgroups), record.cgroup_version) if record.cgroups else None
        if what == "adopt":
            assert child is not None  # verdict adopts only a live process that is still the same
            placement = self.isolation.adopt(record.uid, cgroup) if self.isolation is not None else None
            with self._lock:
                self._procs[record.worker_id] = (record.handle(), child, placement)
            self.state.add(record)
            logger.warning("adopted worker %s of client %s (pid %d), in a session, from dead runtime %s; it is "
                           "never leased again", record.worker_id, record.client_id, record.pid, instance)
            return True
        if what == "remove":
            logger.info("removing worker %s of client %s (pid %d) left by dead runtime %s: in no session",
                        record.worker_id, record.client_id, record.pid, instance)
            if child is not None:
                child.kill()
        if cgroup is not None:
            cgroup.remove(timeout=5.0)  # kills what is left in it, as a worker's end does
            self._remove_parents(cgroup)
        return False

    def _remove_parents(self, cgroup: WorkerCgroup | None) -> None:
        """A dead runtime's parent cgroups, once its last adopted worker is gone (ours stay)."""
        ours = set(self.isolation.cgroups.parents) if self.isolation and self.isolation.cgroups else set()
        for d in cgroup.dirs if cgroup else ():
            if d.parent not in ours:
                try:
                    d.parent.rmdir()
                except OSError:
                    pass  # another worker of it is still adopted, or it is gone

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


def _exit_code_in(log: Path) -> int:
    """An adopted worker's exit code, from its last words (``agent/worker.py`` logs "exits
    with N"); -1 if it said none (killed)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return -1
    found = re.findall(r" exits with (-?\d+)$", tail, re.MULTILINE)
    return int(found[-1]) if found else -1


def _allowed_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
