"""Two runtimes on one gateway address, for a rolling restart on one host.

**Why SO_REUSEPORT, not a passed socket.** With ``SO_REUSEPORT`` every ``serve`` binds the
address itself and the kernel spreads new connections over the processes listening on it.
The new runtime needs nothing from the old one: no handover protocol, no parent-child
relation, no systemd socket unit. It works the same from a shell, from systemd, or after
the old one crashed, and the old one stays free to drain at its own pace. Passing the
listening socket (``SCM_RIGHTS``, or systemd socket activation) would need the old process
alive and cooperating at the moment of the handover, or a socket unit that outlives both,
for no gain here. One thing needs care: a connection the kernel already queued on a
listener is reset when that listener closes (unless ``net.ipv4.tcp_migrate_req=1``, off by
default, moves it). So the old runtime first *steers* every new connection to the new one
(:func:`steer_to_newest`), lets its own queue empty, and only then closes.

**The rule that makes it safe:** a runtime listens beside another one only once it is
*ready* (every pool at ``min_idle``), so that any listener besides its own that a draining
runtime sees on its address is a runtime ready to take its callers. Binding happens at once
(it fails at once if the address belongs to something else); ``listen()`` waits.
The kernel's table of listening sockets (``/proc/net/tcp``, ``tcp6``) says who listens.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
from pathlib import Path

logger = logging.getLogger("autonomite")

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
_SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
_RETURN_1 = struct.pack("HBBI", 0x06, 0, 0, 1)  # one classic BPF instruction: BPF_RET | BPF_K, 1


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


def listening_inodes(port: int, address: str) -> dict[int, int]:
    """The sockets listening on ``port`` whose address overlaps ``address`` (the same one,
    or either is a wildcard), from the kernel's tables: inode -> connections waiting in its
    accept queue."""
    want = ipaddress.ip_address(address.split("%")[0])
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, queues, inode = fields[1], fields[3], fields[4], int(fields[9])
            hex_ip, _, hex_port = local.partition(":")
            if state != _LISTEN or int(hex_port, 16) != port:
                continue
            ip = _ip(hex_ip)
            if ip == want or ip.is_unspecified or want.is_unspecified:
                found[inode] = int(queues.partition(":")[2], 16)  # a listener's rx_queue: its accept queue
    return found


def others_listening(socks: list[socket.socket]) -> set[int]:
    """Inodes of sockets listening on the addresses of ``socks`` that are not ``socks``."""
    return set(_listening(socks)) - _inodes(socks)


def queued(socks: list[socket.socket]) -> int:
    """Connections the kernel queued on ``socks`` that were not accepted yet."""
    ours = _inodes(socks)
    return sum(n for inode, n in _listening(socks).items() if inode in ours)


def steer_to_newest(socks: list[socket.socket]) -> None:
    """From now on the kernel gives every new connection on this address to the runtime
    that listened last, not to these sockets.

    A reuseport group picks a listener by the index a BPF program returns (the kernel's
    ``SO_ATTACH_REUSEPORT_CBPF``); indexes follow the order of ``listen()``, and a closed
    listener's slot is taken by the last one. With two runtimes, the old one and the new one,
    index 1 is the new one, now and after every later restart; where there is no index 1
    (one runtime), the kernel falls back to its hash. The program stays on the address's
    group: the next new runtime gets every connection as soon as it listens."""
    insn = ctypes.create_string_buffer(_RETURN_1, len(_RETURN_1))
    program = struct.pack("HP", 1, ctypes.addressof(insn))  # struct sock_fprog {len; filter*}
    for sock in socks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, program)
        except OSError as e:  # an old kernel: the sysctl net.ipv4.tcp_migrate_req is the other way
            logger.warning("cannot steer new connections to the new runtime: %s", e.strerror)


def _listening(socks: list[socket.socket]) -> dict[int, int]:
    found: dict[int, int] = {}
    for s in socks:
        host, port = s.getsockname()[:2]
        found.update(listening_inodes(port, host))
    return found


def _inodes(socks: list[socket.socket]) -> set[int]:
    return {os.fstat(s.fileno()).st_ino for s in socks if s.fileno() >= 0}


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
    runtime = any(w in ("runtime.server.cli", "runtime.cli") or os.path.basename(w) == "autonomite" for w in words)
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
