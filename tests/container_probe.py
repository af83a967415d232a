"""What a compromised worker would try, run inside a worker's container with its identity.

The test feeds this file to ``docker exec -i <container> python - '<json>'``: the exec'd
process has the container's user, capabilities, no_new_privs, seccomp filter, namespaces
and cgroup, exactly what code running in the worker has. It tries each attack and prints
one JSON object: for each, whether it got through and the error that stopped it.
Nothing here imports the project: the container's python runs it from stdin.

Argument (JSON): ``target_pids`` (another client's worker, as the host numbers them),
``memory_bytes`` (this container's limit: twice that is allocated), ``forks`` (the bound).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import stat
import sys
import time

PTRACE_ATTACH = 16
IDENTITY = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


def status(pid: str) -> dict:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {k: fields.get(k, "").split() for k in IDENTITY}


def context(pid: str) -> dict:
    """Namespaces and cgroup: None where this process may not look."""
    found = {}
    for ns in ("pid", "net", "mnt", "user", "ipc", "uts", "cgroup"):
        try:
            found[ns] = os.readlink(f"/proc/{pid}/ns/{ns}")
        except OSError:
            found[ns] = None
    with open(f"/proc/{pid}/cgroup") as f:
        found["cgroup_path"] = f.read()
    return found


def attempt(fn) -> dict:  # noqa: ANN001
    """{"got": what it read or did, "error": the errno's name}, one of them set."""
    try:
        return {"got": fn(), "error": None}
    except OSError as e:
        return {"got": None, "error": errno.errorcode.get(e.errno, str(e.errno))}


def read_environ(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().decode("latin-1")


def read_memory(pid: int) -> int:
    """Bytes of the target's memory read, from its first readable mapping."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if line.split()[1].startswith("r"):
                mem.seek(start)
                return len(mem.read(min(end - start, 65536)))
    return 0


def ptrace_attach(pid: int) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == -1:
        raise OSError(ctypes.get_errno(), "ptrace")
    return "attached"


def raw_sockets() -> dict:
    return {
        "packet": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).close() or "open"),
        "inet_raw": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close() or "open"),
    }


def fork_bomb(bound: int) -> dict:
    """Fork children that wait to be killed, until ``bound`` or the first refusal; then reap them."""
    children, refused = [], None
    try:
        for _ in range(bound):
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            children.append(pid)
    except OSError as e:
        refused = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
    return {"forked": len(children), "error": refused}


def allocate(size: int) -> dict:
    """Touch ``size`` bytes in a child; how the child ended."""
    pid = os.fork()
    if pid == 0:
        try:
            data = b"\x01" * size  # written, so every page is really taken
            os._exit(0 if len(data) == size else 2)
        except MemoryError:
            os._exit(3)
    _, code = os.waitpid(pid, 0)
    if os.WIFSIGNALED(code):
        return {"completed": False, "ended_by": f"signal {os.WTERMSIG(code)}"}
    return {"completed": os.WEXITSTATUS(code) == 0, "ended_by": f"exit {os.WEXITSTATUS(code)}"}


def privileged_files(root: str = "/") -> list[str]:
    """Files with a setuid or setgid bit or file capabilities, on the root filesystem."""
    found, device = [], os.stat(root).st_dev
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(folder, d)).st_dev == device]
        for name in files:
            path = os.path.join(folder, name)
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISREG(mode) and (mode & (stat.S_ISUID | stat.S_ISGID) or _has_caps(path)):
                    found.append(path)
            except OSError:
                continue
    return found


def _has_caps(path: str) -> bool:
    try:
        return bool(os.getxattr(path, "security.capability", follow_symlinks=False))
    except OSError:
        return False


def main() -> None:
    args = json.loads(sys.argv[1])
    began = time.monotonic()
    report = {
        "self": status("self"), "worker": status("1"),
        "self_context": context("self"), "worker_context": context("1"),
        "visible_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "targets": {
            str(pid): {
                "environ": attempt(lambda pid=pid: read_environ(pid)),
                "memory": attempt(lambda pid=pid: read_memory(pid)),
                "ptrace": attempt(lambda pid=pid: ptrace_attach(pid)),
                "signal": attempt(lambda pid=pid: os.kill(pid, 0) or "signalled"),
            }
            for pid in args["target_pids"]
        },
        "raw_sockets": raw_sockets(),
        "fork_bomb": fork_bomb(args["forks"]),
        "allocation": allocate(2 * args["memory_bytes"]),
        "privileged_files": privileged_files(),
    }
    report["seconds"] = round(time.monotonic() - began, 2)
    print(json.dumps(report))


main()
