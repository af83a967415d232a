"""Where the runtime may send a request a client chose: no address inside the operator's network.

A client's webhook URL is the client's input, and the runtime POSTs to it from inside the
operator's network; without a check, ``http://169.254.169.254/`` (a cloud's metadata
service) or ``http://10.0.0.7:5432/`` would be a request the client makes with the
runtime's reach (SSRF). ``check_url`` refuses a URL whose host resolves to any address
that is not a public one, unless the operator allows private ones (a test, or a
deployment whose clients are its own services). It runs when the config is loaded
(``runtime/settings.py``) and again before each delivery, because a name may resolve
elsewhere later (DNS rebinding): ``resolve`` returns the address it checked, and the
sender connects to that address and no other.

Pure but for ``socket.getaddrinfo``; any thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
logger = logging.getLogger("autonomite.outbound")


class Unresolved(ValueError):
    """The host has no address now: maybe a typo, maybe a DNS blip."""


@dataclass(frozen=True)
class Resolved:
    """A URL that passed the check, and the address it was checked at."""

    scheme: str  # http | https
    host: str  # as written (a name, or an address without brackets): the Host header and TLS name
    port: int
    target: str  # path and query, for the request line
    address: str  # the checked address to connect to


def check_url(url: str, allow_private: bool, unresolved_ok: bool = False) -> None:
    """Raise ValueError saying why the runtime must not send to ``url``; return if it may.

    ``unresolved_ok``: a host that does not resolve passes, with a warning (a config being
    loaded: a DNS blip must not stop a start or a reload; each delivery checks again)."""
    try:
        resolve(url, allow_private)
    except Unresolved as e:
        if not unresolved_ok:
            raise
        logger.warning("webhook URL: %s; accepted for now, each delivery checks it again", e)


def resolve(url: str, allow_private: bool) -> Resolved:
    """``check_url``, returning what was checked (the address first in the resolver's order)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"the scheme must be http or https, not {scheme or 'none'!r}")
    host = parts.hostname
    if not host:
        raise ValueError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not carry a user or password (the request is signed instead)")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise Unresolved(f"the host {host!r} does not resolve ({reason})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise Unresolved(f"the host {host!r} does not resolve (no address)")
    if not allow_private:
        for address in addresses:
            kind = non_public(ipaddress.ip_address(address.split("%", 1)[0]))
            if kind is not None:
                said = f"{address} is" if address == host else f"{host!r} resolves to {address},"
                article = "an" if kind[0] in "aeiouIU" else "a"
                raise ValueError(
                    f"{said} {article} {kind} address: refused (set runtime.webhooks.allow_private to allow private addresses)"
                )
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Resolved(scheme, host, port, target, addresses[0])


def non_public(ip: IPAddress) -> str | None:
    """Which kind of non-public address ``ip`` is, or None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        kind = non_public(ip.ipv4_mapped)
        return f"IPv4-mapped {kind}" if kind else None
    checks = (
        ("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("private", ip.is_private), ("reserved", ip.is_reserved), ("non-global", not ip.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)
