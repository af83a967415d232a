"""Clients kept in Supabase: rows in, validated ClientSettings out, and back for ``push``.

Rows (``config/supabase/schema.sql``) carry the same fields as a YAML client and go
through the same pydantic models, one row at a time, so one bad row never stops the good
ones: it is reported with its id, field and reason (never its values: they may be
secrets). Reading and writing use the official ``supabase`` client; everything else here
is pure and unit-tested.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runtime.settings import ClientSettings, SupabaseSettings

CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RowError:
    row_id: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row_id!r}: {self.field}: {self.reason}"


@dataclass(frozen=True)
class Snapshot:
    """One read of the table: the rows that validated, and why the others did not."""

    clients: dict[str, ClientSettings] = field(default_factory=dict)
    errors: dict[str, RowError] = field(default_factory=dict)
    inactive: frozenset[str] = frozenset()


def row_to_client(row: dict[str, Any]) -> ClientSettings:
    data = {
        "id": row.get("id"),
        "name": row.get("name"),
        "api_token": row.get("api_token"),
        "livekit": {"url": row.get("livekit_url"), "api_key": row.get("livekit_api_key"),
                    "api_secret": row.get("livekit_api_secret")},
        "pool": row.get("pool") or {},
        "agents": row.get("agents"),
    }
    for optional in ("image", "knowledge_dir"):
        if row.get(optional) is not None:
            data[optional] = row[optional]
    return ClientSettings.model_validate(data)


def client_to_row(client: ClientSettings) -> dict[str, Any]:
    """The row ``clients push`` upserts: secrets revealed, for the service_role only."""
    return {
        "id": client.id,
        "name": client.name,
        "api_token": client.api_token.get_secret_value(),
        "livekit_url": client.livekit.url,
        "livekit_api_key": client.livekit.api_key.get_secret_value(),
        "livekit_api_secret": client.livekit.api_secret.get_secret_value(),
        "pool": client.pool.model_dump(mode="json"),
        "image": client.image,
        "knowledge_dir": str(client.knowledge_dir) if client.knowledge_dir else None,
        "agents": [a.for_worker() for a in client.agents],
        "active": True,
    }


_COLUMN = {("livekit", "url"): "livekit_url", ("livekit", "api_key"): "livekit_api_key",
           ("livekit", "api_secret"): "livekit_api_secret"}


def parse_rows(rows: list[dict[str, Any]]) -> Snapshot:
    clients: dict[str, ClientSettings] = {}
    errors: dict[str, RowError] = {}
    inactive: set[str] = set()
    tokens: dict[str, str] = {}
    for row in rows:
        row_id = str(row.get("id") or "?")
        if row.get("active") is False:
            inactive.add(row_id)
            continue
        try:
            client = row_to_client(row)
        except ValidationError as e:
            first = e.errors()[0]
            loc = tuple(first["loc"])
            column = _COLUMN.get(loc[:2]) or ".".join(str(p) for p in loc) or "(row)"
            errors[row_id] = RowError(row_id, column, first["msg"])  # msg only: never the value
            continue
        token = client.api_token.get_secret_value()
        if token in tokens:
            errors[row_id] = RowError(row_id, "api_token", f"shared with client {tokens[token]!r}")
            continue
        tokens[token] = client.id
        clients[client.id] = client
    return Snapshot(clients, errors, frozenset(inactive))


def merge(last_good: dict[str, ClientSettings], snapshot: Snapshot) -> dict[str, ClientSettings]:
    """The set to serve: valid rows as they are; a row that turned bad keeps its last good
    configuration; a deleted or deactivated row is gone (its pool drains)."""
    merged = dict(snapshot.clients)
    for row_id in snapshot.errors:
        if row_id in last_good:
            merged[row_id] = last_good[row_id]
    return merged


class SupabaseStore:
    """The ``clients`` table through supabase-py (PostgREST under ``{url}/rest/v1``).

    Every call blocks on the network: callers run it off the actors' threads and off the
    gateway's loop (the watcher has a thread of its own).
    """

    def __init__(self, settings: SupabaseSettings) -> None:
        from supabase import create_client  # imported only when used
        from supabase.lib.client_options import SyncClientOptions

        self.settings = settings
        options = SyncClientOptions(postgrest_client_timeout=CALL_TIMEOUT_S)
        self._client = create_client(settings.url, settings.service_key.get_secret_value(), options)

    def rows(self) -> list[dict[str, Any]]:
        return list(self._client.table(self.settings.table).select("*").execute().data)

    def upsert(self, clients: list[ClientSettings]) -> None:
        self._client.table(self.settings.table).upsert([client_to_row(c) for c in clients]).execute()


def save_cache(path: Path, rows: list[dict[str, Any]]) -> None:
    """The last good rows, for a start while Supabase is down. They hold secrets: 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f)
    os.replace(tmp, path)


def load_cache(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())
