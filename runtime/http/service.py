"""What the HTTP layer needs of the running runtime.

The gateway and the metrics listener are handed a :class:`Service` rather than the
composition root's ``Runtime`` (which is one), so this package never imports
``runtime.server`` and the two stay one layer apart.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

if TYPE_CHECKING:
    import pykka
    from livekit import api

    from actors.supervisor import Directory
    from runtime.backends import WorkerBackend
    from runtime.clients.source import SourceWatcher
    from runtime.metrics import Metrics
    from runtime.sessions.log import SessionLog
    from runtime.sessions.shipper import Shipper
    from runtime.settings import ClientSettings, ReloadSummary, Settings


class Service(Protocol):
    """Read on the gateway's event loop; every call here is cheap (it reads, or tells an
    actor), except ``reload``, which the gateway runs in an executor."""

    settings: Settings
    metrics: Metrics
    directory: Directory
    source: SourceWatcher | None
    failed: threading.Event
    supervisor: pykka.ActorRef[Any]
    backend: WorkerBackend
    sessions: SessionLog | None  # every trigger's record (runtime/sessions)
    shipper: Shipper | None  # with clients in Supabase: the records on their way there

    def client_by_token(self, token: str) -> ClientSettings | None: ...

    def on_livekit_event(self, client_id: str, event: api.WebhookEvent) -> None: ...

    def reload(self) -> ReloadSummary: ...

    def webhook_stats(self, client_ids: list[str]) -> dict[str, dict[str, Any]]: ...  # blocking: an executor


RUNTIME = web.AppKey("runtime", Service)  # where each app keeps the Service it serves
