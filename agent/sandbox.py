"""A worker's own identity, taken after the fork and before any worker code runs.

Android's zygote model: every worker is forked from one pre-imported process (running as
the runtime's user), and the child, before it runs anything of the worker's, becomes a
principal of its own. Here, in this order (:func:`enter`):

1. **cgroups**: it writes itself into the cgroups the runtime made for it (memory, pids),
   so its limits hold from its first allocation on;
2. **namespaces** (optional): a mount namespace of its own with a fresh ``/proc`` (it is
   already pid 1 of a new pid namespace: the zygote unshared it before the fork), a
   private ``/tmp`` and ``/dev/shm``;
3. **uid and gid**: one pair *per worker* from the runtime's range (``setresgid``,
   ``setresuid``), an empty supplementary group list, every capability gone: the
   bounding set cleared before the uid change (it needs CAP_SETPCAP), permitted and
   effective cleared by the change itself, inheritable and ambient cleared after it;
   securebits locked so that no later exec of a set-user-id root binary grants any;
4. ``no_new_privs`` and ``PR_SET_DUMPABLE 0`` (no one but root may read its memory,
   its ``environ`` or ptrace it, even a process of the same uid);
5. **seccomp**: the filter of :func:`seccomp_filter`, built by libseccomp
   (``pyseccomp``), never by hand.

Then it checks what it became in ``/proc/self/status`` and exits (fail closed) if any of
it did not hold. The same function is what the isolation tests' probe calls to take a
worker's identity, so the probe is exactly as privileged as a worker, no more.

**Per worker, not per client.** Two workers of one client serve two different end users;
a compromised session must not reach the other one, so no two live workers share a uid.

**EPERM, not kill.** A denied call returns EPERM (clone3 ENOSYS, so glibc falls back to
clone, whose flags the filter can read). Denied is denied either way; but a dependency
that probes a feature (a keyring, io_uring, perf counters) then degrades instead of
killing the caller's live session, and EPERM is what an unprivileged process would get
from the kernel anyway. Syscalls of another architecture (the 32-bit ABI, which could
reach ``socketcall`` unfiltered) kill the process: libseccomp's default for a foreign
architecture.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT (+locked): uid 0 gets no capabilities from an exec; KEEP_CAPS locked off;
# NO_CAP_AMBIENT_RAISE (+locked). Not NO_SETUID_FIXUP: the uid change must drop capabilities.
SECUREBITS = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
SOCK_TYPE_MASK = 0xF
SOCK_PACKET = 10

# Whole syscalls a worker never needs and an attacker wants: another process's memory
# (ptrace, process_vm_*, kcmp, pidfd_getfd, process_madvise), the kernel's (bpf, modules,
# kexec, perf), keyrings, namespaces and mounts (a user namespace hands out capabilities),
# io_uring (its socket ops bypass this filter), userfaultfd (an exploit primitive).
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick",
    "mount_setattr", "unshare", "setns",
    "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "fanotify_init",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
)


class SandboxError(Exception):
    """The identity could not be taken; the worker must not run."""


@dataclass(frozen=True)
class Identity:
    """What the runtime decided for one worker; JSON-able (it travels in the settings memfd).

    ``uid``/``gid`` None: the runtime cannot change uids (not root); the rest still holds."""

    uid: int | None = None
    gid: int | None = None
    cgroup_procs: tuple[str, ...] = ()  # each cgroup's ``cgroup.procs``, to write ourselves into
    mount_namespace: bool = False  # a fresh /proc, private /tmp and /dev/shm
    seccomp: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "cgroup_procs": list(self.cgroup_procs),
                "mount_namespace": self.mount_namespace, "seccomp": self.seccomp}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identity:
        return cls(data.get("uid"), data.get("gid"), tuple(data.get("cgroup_procs", ())),
                   bool(data.get("mount_namespace")), bool(data.get("seccomp", True)))


@dataclass
class Outcome:
    """What :func:`enter` applied, for the worker's log line and for the probe's check."""

    applied: list[str] = field(default_factory=list)


def enter(identity: Identity) -> Outcome:
    """Become ``identity``. Call single-threaded, before any worker code. Raises SandboxError."""
    if len(os.listdir("/proc/self/task")) != 1:  # per-thread attributes would not reach the others
        raise SandboxError("taking an identity needs a single-threaded process")
    out = Outcome()
    policy = prepared_filter() if identity.seccomp else None  # before the uid change: it imports
    for procs in identity.cgroup_procs:
        with open(procs, "w") as f:
            f.write("0")  # "0": the writing process
        out.applied.append("cgroup")
    if identity.mount_namespace:
        _private_mounts()
        out.applied.append("mount namespace")
    if identity.uid is not None:
        _drop_to(identity.uid, identity.gid if identity.gid is not None else identity.uid)
        out.applied.append(f"uid {identity.uid}")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)
    if policy is not None:
        policy.load()
        out.applied.append("seccomp")
    check(identity)
    return out


def _drop_to(uid: int, gid: int) -> None:
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    _prctl(PR_SET_SECUREBITS, SECUREBITS)
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # permitted and effective capabilities go with uid 0
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _clear_inheritable()


def _clear_inheritable() -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    if _libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:  # _LINUX_CAPABILITY_VERSION_3
        raise SandboxError(f"capset: {os.strerror(ctypes.get_errno())}")


def _private_mounts() -> None:
    """Our own view: nothing we mount propagates back, /proc shows only our pid namespace."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise SandboxError(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for where in ("/tmp", "/dev/shm"):
        if os.path.isdir(where):
            # The worker's own program may live there (a checkout and its virtualenv under
            # /tmp): those directories are mounted back into the private tmpfs, nothing else.
            kept = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in _program_dirs_under(where)]
            _mount("tmpfs", where, "tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777,size=64m")
            for path, fd in kept:
                _make_traversable(path, where)
                _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                os.close(fd)


def _make_traversable(path: str, top: str) -> None:
    """``path``'s parents inside the fresh tmpfs ``top``, each 0755 whatever the umask: the
    worker's uid must pass through them to its own program, and nothing more."""
    parts = os.path.relpath(path, top).split(os.sep)
    current = top
    for part in parts:
        current = os.path.join(current, part)
        if not os.path.isdir(current):
            os.mkdir(current)
            os.chmod(current, 0o755)


def _program_dirs_under(where: str) -> list[str]:
    """The directories the running program is loaded from (its interpreter's prefixes, its
    import path, this package's checkout) that lie under ``where``: outermost ones only."""
    import agent

    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, os.path.dirname(os.path.dirname(agent.__file__)),
                  *(p for p in sys.path if p)}
    inside = where.rstrip("/") + "/"
    under = sorted({real for p in candidates if os.path.isdir(p) and (real := os.path.realpath(p)).startswith(inside)})
    outermost: list[str] = []
    for path in under:
        if not any(path == top or path.startswith(top + "/") for top in outermost):
            outermost.append(path)
    return outermost


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: bytes | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), data) != 0:
        raise SandboxError(f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise SandboxError(f"prctl({option}): {os.strerror(ctypes.get_errno())}")


_prepared = None


def prepared_filter():  # noqa: ANN201 - a pyseccomp.SyscallFilter
    """The filter, built once per process: the zygote builds it (~25 ms) before it forks,
    so a forked worker only loads it (~0.3 ms)."""
    global _prepared
    if _prepared is None:
        _prepared = seccomp_filter()
    return _prepared


def seccomp_filter():  # noqa: ANN201 - a pyseccomp.SyscallFilter
    """The deny list, as libseccomp compiles it: everything else is allowed."""
    import pyseccomp as sc

    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in DENIED_SYSCALLS:
        f.add_rule(deny, name)
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # its flags are out of a filter's reach
    for flag in NAMESPACE_FLAGS:  # a new namespace of any kind (a user one grants capabilities)
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # Raw and packet sockets: sniffing (the status port's tokens travel in clear) and spoofing.
    f.add_rule(deny, "socket", sc.Arg(0, sc.EQ, socket.AF_PACKET))
    for family in (socket.AF_INET, socket.AF_INET6):
        for kind in (socket.SOCK_RAW, SOCK_PACKET):
            f.add_rule(deny, "socket", sc.Arg(0, sc.EQ, family), sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, kind))
    return f


def status() -> dict[str, str]:
    """``/proc/self/status`` as a mapping: what the kernel says this process is."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def check(identity: Identity) -> None:
    """Fail closed: every attribute the identity promises, read back from the kernel."""
    s, wrong = status(), []
    if identity.uid is not None:
        gid = identity.gid if identity.gid is not None else identity.uid
        if s["Uid"].split() != [str(identity.uid)] * 4 or s["Gid"].split() != [str(gid)] * 4:
            wrong.append(f"uid/gid {s['Uid']} / {s['Gid']}")
        if s["Groups"]:
            wrong.append(f"groups {s['Groups']}")
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            if int(s[cap], 16):
                wrong.append(f"{cap} {s[cap]}")
    if s["NoNewPrivs"] != "1":
        wrong.append("no_new_privs")
    if _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        wrong.append("dumpable")
    if identity.seccomp and s["Seccomp"] != "2":
        wrong.append("seccomp")
    if wrong:
        raise SandboxError("identity not taken: " + ", ".join(wrong))


def new_pid_namespace() -> None:
    """For the zygote's middle process: its next child is pid 1 of a namespace of its own."""
    if _libc.unshare(CLONE_NEWPID) != 0:
        raise SandboxError(f"unshare(CLONE_NEWPID): {os.strerror(ctypes.get_errno())}")
