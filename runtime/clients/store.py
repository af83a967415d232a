"""Clients kept in Supabase: rows in, validated ClientSettings out, and back for ``push``.

Rows (``config/supabase/schema.sql``) carry the same fields as a YAML client and go
through the same pydantic models, one row at a time, so one bad row never stops the good
ones: it is reported with its id, field and reason (never its values: they may be
secrets). Any error while validating a row makes that row bad, nothing more.

A token belongs to one client. Which one, when rows share it, depends on what is being
served, never on the order the table is read in: the client that holds it now keeps it,
and a row that shares a live client's token never gets a pool (``parse_rows``).

Reading and writing use the official ``supabase`` client; everything else here is pure
and unit-tested.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from runtime.outbound import check_url
from runtime.settings import ClientSettings, SupabaseSettings
from runtime.supabase_api import CALL_TIMEOUT_S, REFUSAL_CODES, SupabaseApi, refused

__all__ = ["CALL_TIMEOUT_S", "REFUSAL_CODES", "refused"]  # where they lived first; callers import them here

PAGE_ROWS = 1000  # Supabase's default db-max-rows: a request answers no more


class AccessRefused(Exception):
    """Supabase answered and said no: the key is not the service_role key, or the role
    lost its rights. Not an outage: waiting does not fix it."""


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
    for optional in ("image", "knowledge_dir", "webhook"):  # webhook: {url, secret}, or null
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
        "agents": [a.for_worker().to_json() for a in client.agents],
        "webhook": ({"url": client.webhook.url, "secret": client.webhook.secret.get_secret_value()}
                    if client.webhook else None),
        "active": True,
    }


_COLUMN: dict[tuple[int | str, ...], str] = {("livekit", "url"): "livekit_url", ("livekit", "api_key"): "livekit_api_key",
           ("livekit", "api_secret"): "livekit_api_secret"}


def parse_rows(rows: list[Any], last_good: Mapping[str, ClientSettings] | None = None,
               unchanged: Mapping[str, ClientSettings] | None = None, allow_private: bool = False) -> Snapshot:
    """Validate each row on its own, then settle shared tokens against ``last_good`` (the
    set being served): the result does not depend on the order of ``rows``.

    ``unchanged``: served clients whose rows were not read again (an incremental read).
    They are taken as they are, and weigh in the token checks like any valid row.

    A row's webhook URL is checked as a config file's is (``runtime.outbound.check_url``:
    no private address unless ``allow_private``): such a row is bad, and names why."""
    valid: dict[str, ClientSettings] = dict(unchanged or {})
    errors: dict[str, RowError] = {}
    inactive: set[str] = set()
    for row in rows:
        row_id = str((row.get("id") if isinstance(row, dict) else None) or "?")
        try:
            if row.get("active") is False:
                inactive.add(row_id)
                continue
            client = row_to_client(row)
            if client.webhook is not None:
                check_url(client.webhook.url, allow_private, unresolved_ok=True)
            valid[row_id] = client
        except ValidationError as e:
            first = e.errors()[0]
            loc = tuple(first["loc"])
            column = _COLUMN.get(loc[:2]) or ".".join(str(p) for p in loc) or "(row)"
            errors[row_id] = RowError(row_id, column, first["msg"])  # msg only: never the value
        except ValueError as e:  # check_url's refusal: it names the host, never a secret
            errors[row_id] = RowError(row_id, "webhook.url", str(e))
        except Exception as e:  # noqa: BLE001 - whatever one row does, it stays that row's fault
            errors[row_id] = RowError(row_id, "(row)", f"cannot be validated ({type(e).__name__})")
    errors.update(_shared_tokens(valid, last_good or {}, present=valid.keys() | errors.keys()))
    clients = {row_id: c for row_id, c in valid.items() if row_id not in errors}
    return Snapshot(clients, errors, frozenset(inactive))


def _shared_tokens(
    valid: Mapping[str, ClientSettings], last_good: Mapping[str, ClientSettings], present: set[str]
) -> dict[str, RowError]:
    """The valid rows that may not have their token, because another client has it.

    The holder of a token is the served client that has it, as long as its row is still
    in the table (valid, or bad and so keeping its last good configuration): every other
    row with that token is bad. A token nobody holds goes to the one row that has it; if
    several do, to none of them (which one is meant cannot be known). A holder whose row
    moves to another token frees the old one only at the next read, once it is served
    with the new one: never two live clients with one token, even for a moment."""
    holder = {c.api_token.get_secret_value(): cid for cid, c in last_good.items() if cid in present}
    sharing: dict[str, list[str]] = {}
    for row_id, client in sorted(valid.items()):
        sharing.setdefault(client.api_token.get_secret_value(), []).append(row_id)
    errors: dict[str, RowError] = {}
    for token, row_ids in sharing.items():
        owner = holder.get(token)
        for row_id in row_ids:
            if row_id == owner or (owner is None and len(row_ids) == 1):
                continue
            others = [owner] if owner is not None else [r for r in row_ids if r != row_id]
            errors[row_id] = RowError(row_id, "api_token", "shared with client " + ", ".join(map(repr, others)))
    return errors


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
    gateway's loop (the watcher has a thread of its own). One attempt per call, bounded by
    ``CALL_TIMEOUT_S``: the watcher's next poll is the retry, and a start that cannot read
    fails at once instead of after the library's backoff (1 + 2 + 4 s).
    """

    def __init__(self, settings: SupabaseSettings) -> None:
        self.settings = settings
        self._api = SupabaseApi(settings.url, settings.service_key.get_secret_value())

    def rows(self) -> list[dict[str, Any]]:
        """Every row; raise AccessRefused if the key may not read them, anything else in an outage."""
        return self._select(lambda table: table.select("*"))

    def changed_since(self, stamp: str) -> list[dict[str, Any]]:
        """The rows whose ``updated_at`` is after ``stamp`` (ISO 8601, as the table gave it)."""
        return self._select(lambda table: table.select("*").gt("updated_at", stamp))

    def rows_by_id(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """These rows (those that still exist), a hundred ids per request."""
        wanted, found = sorted(ids), []
        for i in range(0, len(wanted), 100):
            chunk = wanted[i:i + 100]
            found += self._select(functools.partial(_with_ids, chunk))
        return found

    def versions(self) -> dict[str, str]:
        """Every row's id and ``updated_at``, and nothing else: what a resync compares."""
        rows = self._select(lambda table: table.select("id,updated_at"))
        return {str(r.get("id")): str(r.get("updated_at")) for r in rows}

    def _select(self, query: Callable[[Any], Any]) -> list[dict[str, Any]]:
        """Every row the query selects, a page at a time in id order: Supabase answers at
        most ``db-max-rows`` (1,000 by default) rows to one request."""
        from postgrest import APIError

        found: list[dict[str, Any]] = []
        try:
            while True:
                page = query(self._api.table(self.settings.table)).order("id").range(
                    len(found), len(found) + PAGE_ROWS - 1).execute().data
                found += cast("list[dict[str, Any]]", list(page))  # a select answers objects
                if len(page) < PAGE_ROWS:
                    return found
        except APIError as e:
            if refused(self._api.status, e.code):
                raise AccessRefused(f"HTTP {self._api.status}, {e.code}: {str(e.message)[:160]}") from None
            raise

    def upsert(self, clients: list[ClientSettings]) -> None:
        self._api.table(self.settings.table).upsert([client_to_row(c) for c in clients]).execute()


def _with_ids(ids: list[str], table: Any) -> Any:
    return table.select("*").in_("id", ids)


def save_cache(path: Path, clients: list[ClientSettings]) -> None:
    """The set being served, last good configurations included, as rows: a start while
    Supabase is down serves exactly it. They hold secrets: 0600, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump([client_to_row(c) for c in clients], f)
    os.replace(tmp, path)


def load_cache(path: Path) -> list[dict[str, Any]]:
    """The rows ``save_cache`` wrote (a list of rows); raise OSError or ValueError if unreadable."""
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError("not a list of rows")
    return rows
