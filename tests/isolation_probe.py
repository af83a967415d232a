"""An attacker inside one worker: ``python -m tests.isolation_probe PLAN_JSON``.

Started as root (by ``tests/integration/test_isolation.py``, through ``nsenter`` into the
worker's namespaces when it has its own), it first becomes exactly that worker, with the
runtime's own policy module (``agent/sandbox.py``): the worker's uid, gid and (empty)
groups, no capabilities, no_new_privs, its seccomp filter, its cgroups. It checks that it
did (every identity line of ``/proc/self/status``, its cgroups and namespaces, against the
worker's, read while it was still root) and then tries each attack of the plan, printing
one JSON object: ``{"identity": [mismatches], "results": {attack: "denied: ..." | "ALLOWED: ..."}}``.

In a worker's container (``tests/integration/test_docker_isolation.py``) it is fed to the
container's own python by ``docker exec``, which already gives it the worker's identity
(the container's user, capabilities, no_new_privs, seccomp filter, namespaces and cgroup):
with ``"become": false`` it only checks that identity against the worker's (pid 1 there).

Each attack is what a compromised dependency would do: plain syscalls and file opens.
Nothing here imports the project at module level: in a container, only this file is there.
"""

from __future__ import annotations

import ctypes
import encodings.idna  # noqa: F401 - imported lazily by getaddrinfo, and after the drop it may be unreadable
import errno
import json
import os
import signal
import socket
import stat
import sys
import time
import urllib.error
import urllib.request

IDENTITY_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                   "Seccomp", "Seccomp_filters")
libc = ctypes.CDLL(None, use_errno=True)


def status_of(pid: int | str) -> dict[str, str]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def namespaces_of(pid: int | str) -> dict[str, str]:
    return {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in ("pid", "mnt", "net", "user", "ipc", "uts")}


def cgroup_procs_of(pid: int) -> list[str]:
    """The worker's memory and pids cgroups (v1), or its one cgroup (v2), as cgroup.procs paths."""
    found = []
    for line in open(f"/proc/{pid}/cgroup"):
        _, controllers, path = line.strip().split(":", 2)
        if controllers in ("memory", "pids"):
            found.append(f"/sys/fs/cgroup/{controllers}{path}/cgroup.procs")
        elif controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            found.append(f"/sys/fs/cgroup{path}/cgroup.procs")
    return found


def become(worker: int) -> list[str]:
    """Take ``worker``'s identity through the runtime's own policy; return what differs."""
    from agent.sandbox import Identity, enter, prepared_filter

    prepared_filter()  # built while root, as the zygote does before any fork

    want, want_ns = status_of(worker), namespaces_of(worker)
    want_cgroups = open(f"/proc/{worker}/cgroup").read()
    uid, gid = int(want["Uid"].split()[0]), int(want["Gid"].split()[0])
    procs = tuple(cgroup_procs_of(worker))
    if int(want["CapBnd"], 16):  # serve was not root: the worker kept serve's uid and bounding set
        for path in procs:
            open(path, "w").write("0")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        enter(Identity(uid=None, seccomp=want["Seccomp"] == "2"))
    else:
        enter(Identity(uid=uid, gid=gid, cgroup_procs=procs, seccomp=want["Seccomp"] == "2"))
    return differences(want, want_ns, want_cgroups)


def same_as(worker: int) -> list[str]:
    """Already started with ``worker``'s identity (docker exec): what differs from it."""
    return differences(status_of(worker), namespaces_of(worker), open(f"/proc/{worker}/cgroup").read())


def differences(want: dict[str, str], want_ns: dict[str, str], want_cgroups: str) -> list[str]:
    got = status_of("self")
    wrong = [f"{k}: worker {want[k]!r}, probe {got.get(k)!r}" for k in IDENTITY_FIELDS if want[k] != got.get(k)]
    if open("/proc/self/cgroup").read() != want_cgroups:
        wrong.append("cgroups differ")
    got_ns = namespaces_of("self")
    wrong += [f"{n} namespace differs" for n in want_ns if want_ns[n] != got_ns[n]]
    return wrong


# -- attacks: each returns "denied: why" or "ALLOWED: what it got" -------------------------


def attempt(fn) -> str:
    try:
        got = fn()
    except OSError as e:
        return f"denied: {errno.errorcode.get(e.errno, e.errno)}"
    return f"ALLOWED: {got!r}"[:200]


def read_file(path: str) -> str:
    with open(path, "rb") as f:
        return f"{len(f.read(4096))} bytes"


def list_dir(path: str) -> str:
    return f"{len(os.listdir(path))} entries"


def write_into(directory: str) -> str:
    path = os.path.join(directory, "planted-by-probe.md")
    with open(path, "w") as f:
        f.write("planted")
    os.unlink(path)
    return f"wrote {path}"


def append_to(path: str) -> str:
    with open(path, "a") as f:
        f.write("planted by the probe\n")
    return f"appended to {path}"


def read_memory(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        start = int(maps.readline().split("-")[0], 16)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(start)
        return f"{len(mem.read(4096))} bytes of memory"


def write_memory(pid: int) -> str:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0):
        return "opened for writing"


def syscall_result(result: int, what: str) -> str:
    if result == -1:
        raise OSError(ctypes.get_errno(), what)
    return f"{what} returned {result}"


def ptrace_attach(pid: int) -> str:
    return syscall_result(libc.ptrace(16, pid, None, None), "ptrace(PTRACE_ATTACH)")  # 16: PTRACE_ATTACH


def vm_read(pid: int) -> str:
    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    buf = ctypes.create_string_buffer(64)
    local, remote = IoVec(ctypes.cast(buf, ctypes.c_void_p), 64), IoVec(0x400000, 64)
    return syscall_result(libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0),
                          "process_vm_readv")


def signal_it(pid: int) -> str:
    os.kill(pid, 0)  # the permission check of every signal, without harming anyone
    return "may signal it"


def raw_socket(family: int, kind: int, proto: int = 0) -> str:
    socket.socket(family, kind, proto).close()
    return "opened"


def http_status(url: str, token: str | None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return f"ALLOWED: HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"denied: HTTP {e.code}" if e.code in (401, 403) else f"ALLOWED?: HTTP {e.code}"
    except OSError as e:
        return f"denied: {e}"


def fork_bomb(limit: int = 200) -> str:
    """Up to ``limit`` children, each waiting on a pipe; denied if the kernel refuses first."""
    read_end, write_end = os.pipe()
    children, refused = [], None
    for _ in range(limit):
        try:
            pid = os.fork()
        except OSError as e:
            refused = e
            break
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        children.append(pid)
    os.close(write_end)  # every child exits
    for pid in children:
        os.waitpid(pid, 0)
    os.close(read_end)
    if refused is None:
        return f"ALLOWED: {len(children)} forks"
    return f"denied: {errno.errorcode.get(refused.errno, refused.errno)} after {len(children)} forks"


def offer_to_the_oom_killer() -> None:
    """The allocation is what must be stopped. A container's worker is charged for all its
    own pages in the same cgroup, so without this the OOM killer may pick it instead (any
    process may raise its own score). A non-dumpable process (a process worker) cannot:
    its /proc files are root's; its cgroup then holds only the worker and the probe."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except PermissionError:
        pass


def allocate(megabytes: int) -> str:
    """In a child: touch ``megabytes`` of memory. Denied if the kernel kills it on the way."""
    pid = os.fork()
    if pid == 0:
        try:
            offer_to_the_oom_killer()
            chunks = []
            for _ in range(megabytes):
                chunks.append(b"\x01" * (1024 * 1024))  # written, so really resident
        finally:
            os._exit(0)  # whatever happened, the child never runs on into the rest of the probe
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"denied: killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"ALLOWED: {megabytes} MB allocated"


def privileged_files(root: str) -> str:
    """Denied unless a file on ``root``'s filesystem is setuid, setgid or has file capabilities."""
    found, device = [], os.stat(root).st_dev
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(folder, d)).st_dev == device]
        for name in files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode) and (mode & (stat.S_ISUID | stat.S_ISGID) or file_capabilities(path)):
                found.append(path)
    return f"ALLOWED: {found}" if found else "denied: none on the root filesystem"


def file_capabilities(path: str) -> bool:
    try:
        return bool(os.getxattr(path, "security.capability", follow_symlinks=False))
    except OSError:  # ENODATA: none; or unreadable to this uid, so no exec either
        return False


def run(plan: dict) -> dict:
    results: dict[str, str] = {}
    for name, pid in plan["targets"].items():
        results[f"{name}: read environ"] = attempt(lambda: read_file(f"/proc/{pid}/environ"))
        results[f"{name}: read memory"] = attempt(lambda: read_memory(pid))
        results[f"{name}: open memory for writing"] = attempt(lambda: write_memory(pid))
        results[f"{name}: ptrace attach"] = attempt(lambda: ptrace_attach(pid))
        results[f"{name}: process_vm_readv"] = attempt(lambda: vm_read(pid))
        if name != "itself" and plan.get("signals", True):  # its own processes are its to signal
            results[f"{name}: signal"] = attempt(lambda: signal_it(pid))
    for name, path in plan.get("read", {}).items():
        results[f"read {name}"] = attempt(lambda: read_file(path) if os.path.isfile(path) else list_dir(path))
    for name, path in plan.get("write_into", {}).items():
        results[f"write into {name}"] = attempt(lambda: write_into(path))
    for name, path in plan.get("append", {}).items():
        results[f"append to {name}"] = attempt(lambda: append_to(path))
    for name, (url, token) in plan.get("http", {}).items():
        results[name] = http_status(url, token)
    if "allocate_mb" not in plan:
        return results
    results["raw packet socket"] = attempt(lambda: raw_socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
    results["raw IP socket"] = attempt(lambda: raw_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    results["fork bomb (200 forks)"] = fork_bomb(plan.get("forks", 200))
    results[f"allocate {plan['allocate_mb']} MB"] = allocate(plan["allocate_mb"])
    if plan.get("privileged_files"):
        results["setuid, setgid or file-capability binaries"] = privileged_files(plan["privileged_files"])
    return results


def main() -> None:
    plan = json.loads(sys.argv[1])
    started = time.monotonic()
    identity = become(plan["worker"]) if plan.get("become", True) else same_as(plan["worker"])
    results = run(plan)
    print(json.dumps({"identity": identity, "results": results, "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    main()
