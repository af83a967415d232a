"""A worker's status port as both ends see it: one contract, read by the runtime's pool
(actors/pool_machine.py, actors/_watch.py, runtime/handoff.py) and served by the worker
(agent/worker.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Literal

ReportedState = Literal["starting", "idle", "claimed", "busy", "draining"]


@dataclass(frozen=True)
class StatusAddress:
    """Where a worker's status port is and the token it asks for.

    The port answers claims and ends sessions, so every call carries a per-worker token
    (``Authorization: Bearer``). The token is derived from a runtime secret and the worker
    id (:func:`status_token`): a restarted runtime can still talk to the workers it adopts,
    and no worker can reach another's port with its own."""

    host: str
    port: int
    token: str = field(default="", repr=False)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def status_token(key: str, worker_id: str) -> str:
    return hmac.new(key.encode(), f"worker-status:{worker_id}".encode(), hashlib.sha256).hexdigest()[:32]


def read_status(address: StatusAddress, timeout: float = 1.0, wait: float = 0.0, since: str | None = None) -> dict | None:
    """A worker's status; with ``since``, once it differs from that etag (or after ``wait``)."""
    query = f"?since={urllib.parse.quote(since)}&wait={wait:g}" if since else ""
    request = urllib.request.Request(address.url(f"/status{query}"), headers=address.headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout + (wait if since else 0)) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None
