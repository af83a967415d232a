"""The runtime's end of the zygote (``agent/zygote.py``): boot it, ask it to fork, keep it alive.

:class:`Zygote` owns one zygote process. A keeper thread boots it, waits for it to exit and
boots it again after a backoff, so a dead zygote comes back by itself. :meth:`Zygote.fork`
returns a :class:`ForkedChild`, or None whenever the zygote is not serving (still booting,
restarting, or failed): the process backend then starts the worker plainly, so a zygote
failure never stops the pools.

The runtime makes itself a *child subreaper* (PR_SET_CHILD_SUBREAPER): a worker forked by
the zygote is re-parented to the runtime, not to init. So the runtime waits for its exit
code like for any child, and nothing is orphaned when the zygote dies.

Threads: ``fork`` may be called from any thread (one request at a time, under a lock);
the keeper thread alone starts and reaps the zygote process.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from runtime._proc import die_with_parent, prctl

logger = logging.getLogger("autonomite.zygote")

_PR_SET_CHILD_SUBREAPER = 36
BOOT_TIMEOUT_S = 120.0  # importing livekit-agents on a cold disk cache, on a busy machine
FIRST_BOOT_WAIT_S = 60.0  # a start during the very first boot waits for it, not plainly
REPLY_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0


class ForkedChild:
    """A worker forked by the zygote, re-parented to us: the part of ``Popen`` the backend uses.

    A pidfd names the process, so a signal can never reach a recycled pid, and waiting
    with a timeout does not reap it (only :meth:`poll`/:meth:`wait` reap, once, under a lock).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        # Closed only once nobody can use it any more: another thread may be in select() on it.
        weakref.finalize(self, os.close, self._pidfd)
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._reap(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._reap(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is None:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:
                    pass

    def _exited(self, timeout: float | None) -> bool:
        """Whether the process exited (its pidfd is readable then), waiting up to ``timeout``.
        poll, not select: a runtime with many workers holds descriptors above 1024."""
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def _reap(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            self._exited(timeout)
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # not ours after all (the runtime died mid-fork)
                    pid, status = self.pid, 255 << 8
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode


class AdoptedChild(ForkedChild):
    """A worker a dead runtime started, adopted by this one (``runtime/backends/adoption.py``).

    Not our child (its parent died; init or a subreaper above us has it), so the kernel
    gives us no exit code: the pidfd says when it exited, ``exit_code()`` says how (the
    worker's last log line)."""

    def __init__(self, pid: int, exit_code: Callable[[], int]) -> None:
        super().__init__(pid)
        self._exit_code = exit_code

    def _reap(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            if self._exited(timeout):
                with self._lock:
                    if self.returncode is None:
                        self.returncode = self._exit_code()
        return self.returncode


class Zygote:
    def __init__(self, log_path: Path, python: str, env: Mapping[str, str], modules: tuple[str, ...] = ()) -> None:
        self._log_path = log_path
        self._python = python
        self._env = dict(env)
        self._modules = modules
        self._lock = threading.Lock()  # one fork request at a time on the socket
        self._changed = threading.Condition()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._booted_once = False
        self._closed = False
        self.pid: int | None = None  # the serving zygote, for tests and stats
        self.forks = 0
        self.restarts = 0
        prctl(_PR_SET_CHILD_SUBREAPER, 1)
        self._keeper = threading.Thread(target=self._keep, name="zygote-keeper", daemon=True)
        self._keeper.start()

    def fork(self, env: Mapping[str, str], log: IO[bytes], lifeline: int, identity: dict[str, Any] | None = None,
             knowledge: int | None = None, pid_namespace: bool = False) -> ForkedChild | None:
        """Fork a worker with this environment, log file, lifeline (``agent/lifeline.py``),
        identity (``agent/sandbox.py``) and documents (a memfd); None if the zygote cannot now.
        Only the child reads the settings."""
        with self._changed:
            if not self._booted_once:
                self._changed.wait_for(lambda: self._booted_once or self._closed, FIRST_BOOT_WAIT_S)
            sock = self._sock
        if sock is None:
            return None
        settings = os.memfd_create("autonomite-worker", os.MFD_CLOEXEC)
        try:
            os.write(settings, json.dumps({"env": dict(env), "identity": identity}).encode())
            os.lseek(settings, 0, os.SEEK_SET)
            fds = [settings, log.fileno(), lifeline, *([knowledge] if knowledge is not None else [])]
            with self._lock:
                sock.sendmsg(
                    [f"fork {os.getpid()}{' pidns' if pid_namespace else ''}".encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                )
                reply = json.loads(_read_line(sock))
        except (OSError, ValueError) as e:
            logger.error("zygote %s failed a fork (%s); restarting it, plain starts meanwhile", self.pid, e)
            self._kill(sock)
            return None
        finally:
            os.close(settings)
        if "pid" not in reply:
            logger.error("zygote %s refused a fork: %s", self.pid, reply.get("error"))
            if reply.get("fatal"):
                self._kill(sock)
            return None
        self.forks += 1
        return ForkedChild(reply["pid"])

    @property
    def booted(self) -> bool:
        """The first boot is over: forks are served, or (if it failed) plain starts are.
        A bool written once by the keeper thread, read by any thread."""
        return self._booted_once

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # end of file: the zygote exits by itself
        self._keeper.join(timeout=5.0)

    # -- the keeper thread ------------------------------------------------------------------

    def _keep(self) -> None:
        failures = 0
        while not self._closed:
            started = time.monotonic()
            try:
                self._boot()
            except (OSError, ValueError, TimeoutError) as e:
                logger.error("zygote failed to boot: %s; plain starts meanwhile", e)
            with self._changed:
                self._booted_once = True
                self._changed.notify_all()
            if self._proc is not None:
                code = self._proc.wait()
                if not self._closed:
                    logger.warning("zygote %s exited with %s; restarting it, plain starts meanwhile", self.pid, code)
            with self._changed:
                sock, self._sock, self.pid, self._proc = self._sock, None, None, None
            if sock is not None:
                sock.close()
            if self._closed:
                return
            failures = 0 if time.monotonic() - started > MAX_BACKOFF_S else failures + 1
            self.restarts += 1
            with self._changed:
                self._changed.wait_for(lambda: self._closed, min(MAX_BACKOFF_S, 0.5 * 2 ** (failures - 1)))

    def _boot(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        private_dir(self._log_path.parent)
        try:
            with open_private_log(self._log_path) as log:
                self._proc = subprocess.Popen(
                    [self._python, "-m", "agent.zygote", str(theirs.fileno()), *self._modules],
                    env=self._env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=[theirs.fileno()], preexec_fn=die_with_parent,
                )
        finally:
            theirs.close()
        try:
            ours.settimeout(BOOT_TIMEOUT_S)
            ready = json.loads(_read_line(ours))
            if ready.get("threads") != 1:
                raise ValueError(f"zygote booted with {ready.get('threads')} threads")
            ours.settimeout(REPLY_TIMEOUT_S)
        except BaseException:
            ours.close()
            self._proc.kill()
            raise
        with self._changed:
            self._sock, self.pid = ours, self._proc.pid
        logger.info("zygote %s ready", self.pid)

    def _kill(self, sock: socket.socket) -> None:
        """A zygote that failed a request is not trusted with the next: the keeper restarts it."""
        with self._changed:
            if self._sock is sock and self._proc is not None:
                self._sock = None
                self._proc.kill()


def private_dir(path: Path) -> None:
    """A log directory only the runtime may enter: workers never open their log files, they
    write through the descriptor the runtime opened for them."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def open_private_log(path: Path) -> IO[bytes]:
    """A log file to append to, readable by the runtime only (0600, even if it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("the zygote closed its socket")
        data += chunk
    return data
