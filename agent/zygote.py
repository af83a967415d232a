"""The zygote: one pre-imported, single-threaded process that forks warm workers.

A worker spends nearly all of its start importing livekit-agents (seconds of CPU, ~100 MB
of private memory each). The zygote pays that once: it imports everything a worker needs,
freezes the garbage collector's view of those objects (``gc.freeze``, so collections in
the children do not write to, and so un-share, the inherited pages) and forks one child
per worker start. The child then runs the same program as a plainly started worker
(``agent.worker.main``), with the modules already in memory, shared copy-on-write.

Why it is safe to fork here:

- **One OS thread at every fork.** Forking a process that has native threads (the LiveKit
  FFI's tokio runtime, OpenBLAS, onnxruntime) copies their locks but not the threads:
  undefined behaviour. The zygote starts no thread, no event loop and no LiveKit
  connection; numpy's OpenBLAS pool, the one import that starts a thread, is held to one
  thread (``OPENBLAS_NUM_THREADS=1``, set by the runtime); and before every fork the
  zygote counts ``/proc/self/task`` and refuses (and exits) if it is not exactly 1.
- **No client data.** The zygote never reads a worker's settings: the runtime writes them
  (credentials included) into a memfd and passes the descriptor with the fork request
  (SCM_RIGHTS); only the child reads it. The zygote's own environment is the runtime's
  allow-list, without any client's credentials.
- **Parentage.** The child forks once more and the middle process exits, so the worker is
  re-parented to the runtime (a child subreaper, see ``runtime/backends/zygote.py``), so a
  crashed zygote costs no live session, and the runtime can wait for the worker's exit
  code as for any child of its own. The worker learns of the *runtime's* death through its
  lifeline (``agent/lifeline.py``): in a session it goes on, to be adopted by the next
  runtime; otherwise it exits.

- **An identity of its own.** Before it runs any worker code, the child takes the
  identity the runtime chose for it (its settings say which: a uid, its cgroups, seccomp;
  ``agent/sandbox.py``). With namespaces, the middle process unshares a pid namespace
  first, so the worker is pid 1 of its own. The zygote itself is not dumpable: no worker can read or write its memory.

The protocol, on a Unix socket the runtime holds the other end of: the runtime sends
``fork <runtime pid> [pidns]`` with three or four descriptors (the settings memfd, the log
file, the lifeline's read end, and a memfd of the client's documents, which only the
child reads); the zygote answers ``{"pid": N, "threads": 1}`` or ``{"error": ...}``. End of file on the socket
means the runtime is gone: the zygote exits.
"""

from __future__ import annotations

import array
import gc
import json
import os
import signal
import socket
import sys
import time
from typing import Any

from agent.contract import Env

_PR_SET_DUMPABLE = 4
_PR_SET_NAME = 15
MAX_FDS = 4
# Everything a worker imports, so the fork inherits it (``providers`` imports plugins lazily).
PRELOAD = (
    "livekit.rtc", "livekit.rtc.resources", "livekit.api", "livekit.agents", "livekit.agents.ipc._preload",
    "aiohttp", "numpy", "bm25s",
    # what a worker would still import while it starts (found by diffing sys.modules after a fork)
    "multiprocessing.connection", "multiprocessing.forkserver", "multiprocessing.resource_tracker",
    "multiprocessing.spawn", "runpy", "httpcore2", "h2.connection", "anyio.streams.tls", "truststore",
    "openai.resources",
    "agent.worker", "agent.contract", "agent.lease_book", "agent.status_server", "agent.session", "agent.rag",
    "agent.providers", "agent.offline_llm", "agent.priming",
    "pyseccomp", "agent.sandbox",
)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _prctl(option: int, value: int | bytes) -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def preload(extra: list[str]) -> list[str]:
    """Import what a worker needs; return the optional plugins that could not be imported."""
    import importlib

    from agent.providers import PLUGIN_MODULES

    missing = []
    for name in (*PRELOAD, *PLUGIN_MODULES.values(), *extra):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
        if threads() != 1:  # fail here, naming the culprit, rather than fork a threaded process
            raise SystemExit(f"zygote: importing {name} started a thread; not forking from this process")
    _warm_up()
    from agent import sandbox

    sandbox.prepared_filter()  # compiled once here, loaded by each child
    return missing


def _warm_up() -> None:
    """One-time work a worker would otherwise do while it starts: building the default TLS
    context parses the whole CA bundle (~20 ms of a forked worker's ~55 ms of CPU to
    registered). livekit-agents caches it per trust configuration (a private helper,
    checked in 1.8; if it moves, the worker just builds its own)."""
    try:
        from livekit.agents.utils import http_context

        http_context._create_ssl_context()  # noqa: SLF001 - see above
    except (ImportError, AttributeError):
        pass


def serve(sock: socket.socket) -> None:
    """Fork one worker per request until the runtime closes the socket."""
    while True:
        fds = array.array("i")
        try:
            msg, ancdata, _, _ = sock.recvmsg(256, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except InterruptedError:
            continue
        if not msg:
            return  # the runtime is gone
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        words = msg.decode().split()
        try:
            reply = (_fork_worker(int(words[1]), list(fds), "pidns" in words[2:]) if len(fds) in (3, 4)
                     else {"error": "expected 3 or 4 fds"})
        finally:
            for fd in fds:
                os.close(fd)
        if "pid" in reply:
            print(f"forked worker {reply['pid']} with {reply['threads']} thread(s) in the zygote", flush=True)
        sock.sendall(json.dumps(reply).encode() + b"\n")
        if reply.get("fatal"):
            return


def _fork_worker(runtime_pid: int, fds: list[int], pid_namespace: bool = False) -> dict[str, Any]:
    count = threads()
    if count != 1:
        return {"error": f"zygote has {count} threads; refusing to fork", "fatal": True}
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:  # the middle process: fork the worker, tell its pid, go
        try:
            os.close(read_end)
            me = os.getpid()  # not the child's getppid(): by then this process may be gone
            if pid_namespace:
                from agent.sandbox import new_pid_namespace

                new_pid_namespace()
            worker = os.fork()
            if worker == 0:
                os.close(write_end)
                _become_worker(runtime_pid, me, *fds)
            os.write(write_end, str(worker).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        pid = pipe.read()
    os.waitpid(middle, 0)  # once it is reaped, the worker's parent is the runtime
    if not pid:
        return {"error": "the fork did not report a worker pid"}
    return {"pid": int(pid), "threads": count}


def _become_worker(runtime_pid: int, middle_pid: int, settings_fd: int, log_fd: int, lifeline_fd: int,
                   knowledge_fd: int = -1) -> None:
    """In the worker: detach from the zygote, take this worker's settings and identity, run
    it. Never returns."""
    code = 1
    try:
        os.setsid()  # its own session: the runtime can tell its descendants apart
        # The parent as the runtime sees it: getppid() says 0 in a pid namespace of our own,
        # and a /proc mounted later would too; this descriptor reads the runtime's /proc.
        status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        deadline = time.monotonic() + 5.0
        while _parent(status_fd) == middle_pid and time.monotonic() < deadline:
            time.sleep(0.001)
        with os.fdopen(settings_fd, "rb", closefd=True) as f:
            settings = json.loads(f.read())
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        if settings.get("identity") is not None:
            _take_identity(settings["identity"])
        _prctl(_PR_SET_NAME, b"worker")  # what ps and top show (its cmdline stays the zygote's)
        if _parent(status_fd) != runtime_pid:  # the runtime died before we were re-parented to it
            os._exit(1)
        os.environ.clear()
        os.environ.update(settings["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        # The lifeline at 3 (end of file there: the runtime died, agent/lifeline.py), the
        # client's documents at 4 (agent/rag.py); moved up first, so neither lands on the other.
        import fcntl

        kept = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (lifeline_fd, knowledge_fd) if fd >= 0]
        for target, fd in enumerate(kept, start=3):
            os.dup2(fd, target)
        os.environ[Env.LIFELINE_FD] = "3"
        if knowledge_fd >= 0:
            os.environ[Env.KNOWLEDGE_FD] = "4"
        os.closerange(3 + len(kept), 1 << 16)  # nothing else of the zygote's
        # As a fresh interpreter has them: SIGINT raises KeyboardInterrupt, SIGPIPE stays
        # ignored (a write to a closed socket is an error, not death), SIGTERM the default;
        # but pid 1 of a namespace ignores a signal that has no handler: it exits on one.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if os.getpid() != 1
                      else (lambda *_: os._exit(128 + signal.SIGTERM)))
        from agent.worker import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - in a forked child nothing may unwind into the zygote
        import traceback

        traceback.print_exc()
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _parent(status_fd: int) -> int:
    text = os.pread(status_fd, 4096, 0).decode()
    return int(text.split("\nPPid:", 1)[1].split()[0])


def _take_identity(identity: dict[str, Any]) -> None:
    from agent.sandbox import Identity, enter

    taken = enter(Identity.from_json(identity))
    print(f"worker identity: {', '.join(taken.applied) or 'unchanged'}; no_new_privs, not dumpable", flush=True)


def main() -> None:
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runtime stops us by closing the socket
    _prctl(_PR_SET_NAME, b"zygote")
    _prctl(_PR_SET_DUMPABLE, 0)  # an exec made it dumpable again; no worker may read or write it
    missing = preload(sys.argv[2:])
    gc.freeze()  # from here on, collections in the children leave the inherited objects alone
    print(f"zygote {os.getpid()} ready; optional modules not installed: {', '.join(missing) or 'none'}", flush=True)
    sock.sendall(json.dumps({"ready": os.getpid(), "threads": threads()}).encode() + b"\n")
    serve(sock)


if __name__ == "__main__":
    main()
