"""Following the clients in Supabase: poll, validate row by row, and apply what changed.

The watcher runs in a thread of its own (never an actor's, never the gateway's loop). Each
poll reads the table, merges it with the set being served (``client_store.parse_rows`` and
``merge``) and, if the set changed, hands it to the same path as a file reload
(``Runtime.apply``): a new client gets a pool, a deleted or deactivated one drains, changed
credentials or agents replace idle workers rolling while leased ones finish.

Nothing a poll meets changes what is served except a good read: the last good set stays,
``/readyz`` says what it said, and the source shows down (``autonomite_client_source_up``
0, ``source.up`` false with its ``down_reason`` in the stats, one log line per change of
state, not one per poll). It is down for one of three reasons:

- ``unreachable``: an outage; it ends by itself.
- ``refused``: the key may not read the table (not the service_role key, or a grant
  revoked). Waiting will not fix it, but stopping would hang up every caller for a fault
  in the control plane: the runtime serves on and says so loudly; the grant can be fixed
  live, a new key needs a restart. At start, the same error stops ``serve`` (nothing is
  served yet, and a cache would hide the mistake).
- ``crashed``: a poll raised (a bug: a bad row or an outage never does). It is counted in
  ``autonomite_client_source_watcher_crashes_total`` and the loop goes on polling.

The cache file holds the set being served, written when it changes, so that a start while
Supabase is down serves exactly what was served. State owned by the watcher's thread;
``status()`` reads a snapshot under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.clients.changes import Changes, Plan
from runtime.clients.store import (
    AccessRefused,
    RowError,
    Snapshot,
    SupabaseStore,
    load_cache,
    merge,
    parse_rows,
    save_cache,
)
from runtime.errors import describe
from runtime.metrics import Metrics
from runtime.settings import ClientSettings, ReloadSummary, SupabaseSettings

logger = logging.getLogger("autonomite.source")

_DOWN_LOG = {
    "unreachable": "client source: Supabase unreachable (%s); serving the last good clients",
    "refused": "client source: Supabase refused the key (%s); serving the last good clients until the key or "
               "its grants are fixed (a new key needs a restart)",
    "crashed": "client source: a poll crashed (%s); serving the last good clients and polling on",
}


class SourceUnavailable(Exception):
    """The clients cannot be read at start: Supabase refuses the key, or is unreachable
    with no cache file to start from."""


class SourceWatcher:
    def __init__(
        self,
        settings: SupabaseSettings,
        metrics: Metrics,
        store: SupabaseStore | None = None,
        allow_private_webhooks: bool = False,
    ) -> None:
        self.settings = settings
        self.allow_private = allow_private_webhooks  # runtime.webhooks.allow_private: a row's URL is checked
        self.metrics = metrics
        self.store = store or SupabaseStore(settings)
        self.apply: Callable[[list[ClientSettings]], ReloadSummary] = lambda clients: ReloadSummary([], [], [])
        self.clients: dict[str, ClientSettings] = {}
        self.errors: dict[str, RowError] = {}
        self.down: tuple[str, str] | None = None  # (kind, detail) while down, see the module's docstring
        self.last_ok: float | None = None
        self._cached: dict[str, ClientSettings] | None = None  # what the cache file holds, if this run wrote it
        self._lock = threading.Lock()
        self._polling = threading.Lock()  # the watcher's thread and a reload may both poll
        self.changes = Changes()  # what to read next (under _polling)
        self._recheck_bad = False  # the last poll changed the served set: read the bad rows again
        self._stop = threading.Event()
        self._poll_now = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def up(self) -> bool:
        return self.down is None

    # -- start ---------------------------------------------------------------------------

    def first_read(self) -> list[ClientSettings]:
        """The clients to start with: from Supabase, else from the cache file, else raise.

        When both answer, the cache says who was served: the clients that held a token
        keep it, and a row bad now keeps its cached configuration, as across a poll."""
        cached = self._read_cache()
        try:
            rows = self.store.rows()
        except AccessRefused as e:
            raise SourceUnavailable(
                f"Supabase at {self.settings.url} refused the key ({e}): clients_source.supabase.service_key "
                "must be the project's service_role key"
            ) from None
        except Exception as e:  # noqa: BLE001 - any other failure to read is an outage
            if cached is None:
                raise SourceUnavailable(
                    f"cannot read clients from Supabase at {self.settings.url} ({_describe(e)}) "
                    "and no clients_source.supabase.cache_file to start from"
                ) from None
            logger.error("client source: Supabase unreachable at start (%s); starting from the cache file %s",
                         _describe(e), self.settings.cache_file)
            self.down = ("unreachable", _describe(e))
            self.metrics.source_up.set(0)
            self._take(cached)
            self._cached = dict(self.clients)
        else:
            self.metrics.source_rows_read.inc(len(rows))
            self.clients = dict(cached.clients) if cached is not None else {}
            self._take(parse_rows(rows, self.clients, allow_private=self.allow_private))
            self.changes.took(rows, (), whole=True)
            self._save_cache()
            self._set_up()
        return list(self.clients.values())

    def start(self, apply: Callable[[list[ClientSettings]], ReloadSummary]) -> None:
        self.apply = apply
        self._thread = threading.Thread(target=self._run, name="client-source", daemon=True)
        self._thread.start()
        if self.settings.database_url is not None:
            threading.Thread(target=self._listen, name="client-source-listen", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._poll_now.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    # -- polling -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll_now.wait(self.settings.poll_interval_s)
            self._poll_now.clear()
            if not self._stop.is_set():
                self.poll_once()  # never raises: the loop outlives any poll

    def _listen(self) -> None:
        """LISTEN for the table's NOTIFY and poll at once on each. The poll stays the
        backstop: a lost connection is retried, and nothing is missed meanwhile for long."""
        import psycopg

        if self.settings.database_url is None:
            return
        dsn = self.settings.database_url.get_secret_value()
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute("LISTEN autonomite_clients")
                    logger.info("client source: listening for changes to the clients table")
                    self.refresh()  # whatever changed while we were not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0, stop_after=1):
                            if note.payload:  # the row's id; none (a truncate): the resync finds it
                                self.changes.named(note.payload)
                            self.refresh()
            except Exception as e:  # noqa: BLE001 - the DSN's password is never in psycopg's text
                logger.warning("client source: LISTEN failed (%s); polling meanwhile", type(e).__name__)
                self._stop.wait(5.0)

    def refresh(self) -> None:
        """Poll now (a reload, SIGHUP), without waiting for the interval."""
        self._poll_now.set()

    def poll_once(self, whole: bool = False) -> ReloadSummary | None:
        """Read the table once (what changed, or ``whole``: every row, as an operator's
        reload asks); return what ``apply`` returned, or None if nothing changed.

        Never raises: a crash is logged, counted and shown as the source down until a poll
        succeeds, and the caller (the watcher's loop, a reload) goes on."""
        with self._polling:
            if whole:
                self.changes.forget()
            try:
                return self._poll()
            except Exception as e:  # noqa: BLE001 - a bug; the next poll may well succeed
                self.metrics.source_watcher_crashes.inc()
                self._set_down("crashed", _crash_site(e))
                return None

    def _poll(self) -> ReloadSummary | None:
        plan = self.changes.plan()
        try:
            rows, gone, whole, by_id = self._read(plan)
        except AccessRefused as e:
            self._set_down("refused", str(e))
            return None
        except Exception as e:  # noqa: BLE001 - an outage: keep serving the last good set
            self._set_down("unreachable", _describe(e))
            return None
        self.metrics.source_rows_read.inc(len(rows))
        if not (whole or rows or gone):
            self.changes.took([], (), whole=False)
            self._set_up()
            return None  # nothing changed: the common case, and it cost one small request
        before = self.clients
        self._take(self._snapshot(rows, gone, whole))
        # Only once taken: a poll that crashed before this reads the same rows again.
        self.changes.took(rows, gone, whole, by_id)
        # A client that moved to another token frees the old one only at the next read
        # (store._shared_tokens): the bad rows are read again then.
        self._recheck_bad = bool(self.errors) and self.clients != before
        self._save_cache()
        self._set_up()  # only once the read is taken: a poll that crashes on it leaves the source down
        if self.clients == before:
            return None
        try:
            return self.apply(list(self.clients.values()))
        except Exception:  # a set the runtime refused: say so, poll on
            logger.exception("applying the clients read from Supabase failed")
            return None

    def _read(self, plan: Plan) -> tuple[list[dict[str, Any]], set[str], bool, set[str]]:
        """This poll's rows, the ids gone from the table, whether the rows are all of it, and
        which were read by id (see runtime/clients/changes.py for what is read when)."""
        if plan.since is None:
            return self.store.rows(), set(), True, set()
        rows = self.store.changed_since(plan.since)
        named: set[str] = set(plan.by_id)
        gone: set[str] = set()
        if plan.resync:
            named, gone = self.changes.stale(self.store.versions())
            named |= plan.by_id
        if rows or named or gone or self._recheck_bad:
            named |= set(self.errors)  # something changed: a bad row may be good now (a token freed)
        named -= {str(row.get("id")) for row in rows}
        if named:
            more = self.store.rows_by_id(named)
            gone |= named - {str(row.get("id")) for row in more}
            rows += more
        return rows, gone, False, named

    def _snapshot(self, rows: list[dict[str, Any]], gone: set[str], whole: bool) -> Snapshot:
        if whole:
            return parse_rows(rows, self.clients, allow_private=self.allow_private)
        read = {str(row.get("id")) for row in rows} | gone
        unchanged = {cid: c for cid, c in self.clients.items() if cid not in read}
        snapshot = parse_rows(rows, self.clients, unchanged=unchanged, allow_private=self.allow_private)
        kept = {row_id: e for row_id, e in self.errors.items() if row_id not in read}
        return Snapshot(snapshot.clients, {**kept, **snapshot.errors}, snapshot.inactive)

    def _take(self, snapshot: Snapshot) -> None:
        merged = merge(self.clients, snapshot)
        for row_id, error in snapshot.errors.items():
            if row_id not in self.errors:
                kept = "; its last good configuration stays" if row_id in merged else "; skipped"
                logger.error("client source: %s%s", error, kept)
            self.metrics.source_bad_rows.labels(row_id).set(1)
        for row_id in set(self.errors) - set(snapshot.errors):
            logger.info("client source: row %r is valid again", row_id)
            self.metrics.source_bad_rows.remove(row_id)
        with self._lock:
            self.clients, self.errors = merged, dict(snapshot.errors)

    def _set_up(self) -> None:
        self.last_ok = time.monotonic()
        if self.down is not None:
            logger.warning("client source: Supabase answers again (the source was down: %s)", self.down[0])
        self.down = None
        self.metrics.source_up.set(1)

    def _set_down(self, kind: str, detail: str) -> None:
        if self.down is None or self.down[0] != kind:  # one line per change of state, not per poll
            logger.error(_DOWN_LOG[kind], detail)
        self.down = (kind, detail)
        self.metrics.source_up.set(0)

    # -- the cache file ------------------------------------------------------------------

    def _read_cache(self) -> Snapshot | None:
        path = self.settings.cache_file
        if path is None or not Path(path).exists():
            return None
        try:
            return parse_rows(load_cache(Path(path)), allow_private=self.allow_private)
        except (OSError, ValueError) as e:
            logger.error("client source: the cache file %s cannot be read (%s); not using it", path, describe(e, 80))
            return None

    def _save_cache(self) -> None:
        """Write the set being served, when it changed since the last write."""
        if self.settings.cache_file is None or self.clients == self._cached:
            return
        try:
            save_cache(Path(self.settings.cache_file), list(self.clients.values()))
        except OSError as e:
            logger.error("cannot write the client cache file %s: %s", self.settings.cache_file, e.strerror)
            return
        self._cached = dict(self.clients)

    def status(self) -> dict[str, Any]:
        """For the admin's stats: is the source up, since when, why not, and which rows are bad."""
        with self._lock:
            errors = {row_id: f"{e.field}: {e.reason}" for row_id, e in sorted(self.errors.items())}
        age = None if self.last_ok is None else round(time.monotonic() - self.last_ok, 1)
        down = self.down
        return {"kind": "supabase", "up": down is None, "down_reason": None if down is None else f"{down[0]}: {down[1]}",
                "last_read_s_ago": age, "bad_rows": errors}


def _describe(error: BaseException) -> str:
    """Type and first line: enough to act on, and no URL query or key (supabase-py puts
    neither in its errors; the text is cut short all the same). PostgREST's own errors
    (``postgrest.APIError``) carry a code and a message: those, not the proxy's HTML."""
    code, message = getattr(error, "code", None), getattr(error, "message", None)
    if code and message:
        return f"{type(error).__name__} {code}: {str(message)[:160]}"
    return describe(error, 160)


def _crash_site(error: BaseException) -> str:
    """The exception's type and where it was raised: enough to find the bug, and none of
    its message (which may quote a row's values, secrets included)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(error).__name__}{where}"
