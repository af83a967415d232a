"""Free loopback ports: for a worker's status server, and for the dev tools and tests.

A worker binds the port it is given, so the pool picks one that is free right now; the
kernel may still hand it out again before the worker binds it, and the worker then fails
to start like any other start failure.
"""

from __future__ import annotations

import socket


def free_port(count: int = 1) -> int:
    """A loopback TCP port such that ``count`` consecutive ports are free right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base: int = s.getsockname()[1]
        if base + count > 65535:
            continue
        if all(_port_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError("no free port range found on 127.0.0.1")


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True
