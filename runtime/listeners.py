"""Two runtimes on one gateway address, for a rolling restart on one host.

**Why SO_REUSEPORT, not a passed socket.** With ``SO_REUSEPORT`` every ``serve`` binds the
address itself and the kernel spreads new connections over the processes listening on it.
The new runtime needs nothing from the old one: no handover protocol, no parent-child
relation, no systemd socket unit. It works the same from a shell, from systemd, or after
the old one crashed, and the old one stays free to drain at its own pace. Passing the
listening socket (``SCM_RIGHTS``, or systemd socket activation) would need the old process
alive and cooperating at the moment of the handover, or a socket unit that outlives both,
for no gain here. The price: connections the kernel already queued on a listener are reset
when that listener closes (unless ``net.ipv4.tcp_migrate_req=1`` moves them); the old
runtime accepts as fast as it can and closes only once another runtime listens beside it.

**The rule that makes it safe:** a runtime listens beside another one only once it is
*ready* (every pool at ``min_idle``), so that any listener besides its own that a draining
runtime sees on its address is a runtime ready to take its callers. Binding happens at once
(it fails at once if the address belongs to something else); ``listen()`` waits.
The kernel's table of listening sockets (``/proc/net/tcp``, ``tcp6``) says who listens.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger("autonomite")

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address ``host`` names, with SO_REUSEPORT, not yet listening.
    Raises OSError (address in use by something that is not a runtime, no such address...)."""
    found = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((f, k, p, "", a) for f, k, p, _, a in found):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def listening_inodes(port: int, address: str) -> set[int]:
    """The inodes of the sockets listening on ``port`` whose address overlaps ``address``
    (the same one, or either is a wildcard), from the kernel's tables."""
    want = ipaddress.ip_address(address.split("%")[0])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            hex_ip, _, hex_port = local.partition(":")
            if state != _LISTEN or int(hex_port, 16) != port:
                continue
            ip = _ip(hex_ip)
            if ip == want or ip.is_unspecified or want.is_unspecified:
                inodes.add(inode)
    return inodes


def others_listening(socks: list[socket.socket]) -> set[int]:
    """Inodes of sockets listening on the addresses of ``socks`` that are not ``socks``."""
    ours = {os.fstat(s.fileno()).st_ino for s in socks}
    found: set[int] = set()
    for s in socks:
        host, port = s.getsockname()[:2]
        found |= listening_inodes(port, host)
    return found - ours


def owners(inodes: set[int]) -> list[int]:
    """The pids of the ``autonomite serve`` processes holding these sockets (never another
    program: a runtime only ever signals a runtime)."""
    links = {f"socket:[{i}]" for i in inodes}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            holds = any(os.readlink(fd) in links for fd in (entry / "fd").iterdir())
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if holds and _is_serve(argv):
            pids.append(int(entry.name))
    return sorted(pids)


def _is_serve(argv: list[bytes]) -> bool:
    words = [a.decode(errors="replace") for a in argv]
    runtime = any(w == "runtime.cli" or os.path.basename(w) == "autonomite" for w in words)
    return runtime and "serve" in words


def _ip(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_ip)  # in host byte order, 32 bits at a time
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify``) how ``serve`` is doing: ``READY=1`` once warm and
    listening, ``STOPPING=1`` when the drain begins. Nothing without ``NOTIFY_SOCKET``."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:  # best effort: systemd's own timeout says the rest
        logger.warning("cannot notify systemd at %s: %s", target, e)
