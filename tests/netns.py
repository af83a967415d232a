"""Network namespaces a test creates, joined by a veth pair: two "hosts" on one machine.

Why: the swarm backend must work when a worker runs on another node, reached at that
node's address. Two namespaces with their own addresses make that real without sending a
packet anywhere but between them (and their own loopbacks), and ``ip netns delete`` takes
every interface and address with it.

Two ways in:
- a child process: :meth:`NetNs.exec_argv` wraps a command in ``ip netns exec``;
- this process: :func:`inside` moves the *calling thread* into a namespace for a while
  (network namespaces are per thread in Linux). The sockets it opens meanwhile, and the
  processes and threads it starts, live there. Pytest runs fixtures and tests on one
  thread, so a module fixture can put a whole module's test code on the "manager host".
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(netns: NetNs) -> Iterator[None]:
    """The calling thread in ``netns`` until the block ends, then back where it was."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/var/run/netns/{netns.name}")
        try:
            yield
        finally:  # a thread left behind in a test's namespace would run every later test there
            if ctypes.CDLL("libc.so.6", use_errno=True).setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the thread's own network namespace")
    finally:
        os.close(home)


def cgroup_remount() -> str:
    """Shell lines that mount the cgroup hierarchies again as the host has them.

    ``ip netns exec`` gives its command a mount namespace with a fresh /sys (so /sys/class/net
    shows the namespace's interfaces), which hides /sys/fs/cgroup; dockerd needs it back."""
    lines = []
    for entry in open("/proc/self/mounts"):
        source, target, fstype, options = entry.split()[:4]
        if target == "/sys/fs/cgroup" or target.startswith("/sys/fs/cgroup/"):
            if fstype in ("cgroup", "cgroup2", "tmpfs"):
                lines.append(f"mkdir -p {target} && mount -t {fstype} -o {options} {source} {target}")
    return "\n".join(lines)


class NetNs:
    """One namespace with its loopback up; :func:`link` gives it an address on a veth."""

    def __init__(self, prefix: str = "atn") -> None:
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        self.address: str | None = None
        self.veth: str | None = None  # its end of the link, once linked

    def create(self, teardown: contextlib.ExitStack | None = None) -> NetNs:
        """Add it (and, with ``teardown``, its deletion at once, so a failure after cannot leak it)."""
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        if teardown is not None:
            teardown.callback(self.delete)
        self.ip("link", "set", "lo", "up")
        return self

    def kill_all(self) -> None:
        """SIGKILL whatever still runs in it (a node's containerd and shims, say)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def cut(self, cut: bool = True) -> None:
        """Take its end of the link down (a partition: whatever runs inside keeps running,
        but reaches the other side no more), or, with ``cut=False``, up again."""
        assert self.veth, "not linked"
        self.ip("link", "set", self.veth, "down" if cut else "up")

    def exec_argv(self, argv: list[str], remount_cgroups: bool = False) -> list[str]:
        if not remount_cgroups:
            return ["ip", "netns", "exec", self.name, *argv]
        script = f'set -e\n{cgroup_remount()}\nexec "$@"'
        return ["ip", "netns", "exec", self.name, "sh", "-c", script, "sh", *argv]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def delete(self) -> None:
        """Kill whatever still runs in it, then delete it (with its end of the veth)."""
        self.kill_all()
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


def link(a: NetNs, b: NetNs, subnet: str = "10.231.0") -> None:
    """A veth pair between ``a`` (``subnet``.1) and ``b`` (``subnet``.2), both up."""
    end_a, end_b = f"va-{a.name[-6:]}", f"vb-{b.name[-6:]}"
    subprocess.run(["ip", "link", "add", end_a, "netns", a.name, "type", "veth", "peer", "name", end_b,
                    "netns", b.name], check=True, capture_output=True)
    for ns, end, host in ((a, end_a, 1), (b, end_b, 2)):
        ns.ip("addr", "add", f"{subnet}.{host}/24", "dev", end)
        ns.ip("link", "set", end, "up")
        ns.address, ns.veth = f"{subnet}.{host}", end
