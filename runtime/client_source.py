"""Following the clients in Supabase: poll, validate row by row, and apply what changed.

The watcher runs in a thread of its own (never an actor's, never the gateway's loop). Each
poll reads the table, merges it with the last good set (``client_store.merge``) and, if
the set changed, hands it to the same path as a file reload (``Runtime.apply``): a new
client gets a pool, a deleted or deactivated one drains, changed credentials or agents
replace idle workers rolling while leased ones finish.

An outage changes nothing that is served: the last good set stays, ``/readyz`` says what
it said, and the outage shows in ``autonomite_client_source_up`` and in one log line per
change of state (not one per poll).

State owned by the watcher's thread; ``status()`` reads a snapshot under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from runtime.errors import describe
from runtime.client_store import RowError, SupabaseStore, load_cache, merge, parse_rows, save_cache
from runtime.metrics import Metrics
from runtime.settings import ClientSettings, SupabaseSettings

logger = logging.getLogger("autonomite.source")


class SourceUnavailable(Exception):
    """Supabase could not be read at start and no cache file stands in for it."""


class SourceWatcher:
    def __init__(
        self,
        settings: SupabaseSettings,
        metrics: Metrics,
        store: SupabaseStore | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store or SupabaseStore(settings)
        self.apply: Callable[[list[ClientSettings]], object] = lambda clients: None
        self.clients: dict[str, ClientSettings] = {}
        self.errors: dict[str, RowError] = {}
        self.up = True
        self.last_ok: float | None = None
        self._lock = threading.Lock()
        self._polling = threading.Lock()  # the watcher's thread and a reload may both poll
        self._stop = threading.Event()
        self._poll_now = threading.Event()
        self._thread: threading.Thread | None = None

    # -- start ---------------------------------------------------------------------------

    def first_read(self) -> list[ClientSettings]:
        """The clients to start with: from Supabase, else from the cache file, else raise."""
        try:
            rows = self.store.rows()
        except Exception as e:  # noqa: BLE001 - any failure to read is an outage
            cache = self.settings.cache_file
            if cache is None or not Path(cache).exists():
                raise SourceUnavailable(
                    f"cannot read clients from Supabase at {self.settings.url} ({_describe(e)}) "
                    "and no clients_source.supabase.cache_file to start from"
                ) from None
            logger.error("Supabase unreachable at start (%s); starting from the cache file %s", _describe(e), cache)
            rows = load_cache(Path(cache))
            self._set_up(False)
        else:
            self._saved(rows)
            self._set_up(True)
        self._take(parse_rows(rows))
        return list(self.clients.values())

    def start(self, apply: Callable[[list[ClientSettings]], object]) -> None:
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
                self.poll_once()

    def _listen(self) -> None:
        """LISTEN for the table's NOTIFY and poll at once on each. The poll stays the
        backstop: a lost connection is retried, and nothing is missed meanwhile for long."""
        import psycopg

        dsn = self.settings.database_url.get_secret_value()
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute("LISTEN autonomite_clients")
                    logger.info("client source: listening for changes to the clients table")
                    self.refresh()  # whatever changed while we were not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.refresh()
            except Exception as e:  # noqa: BLE001 - the DSN's password is never in psycopg's text
                logger.warning("client source: LISTEN failed (%s); polling meanwhile", type(e).__name__)
                self._stop.wait(5.0)

    def refresh(self) -> None:
        """Poll now (a reload, SIGHUP), without waiting for the interval."""
        self._poll_now.set()

    def poll_once(self) -> object:
        """Read the table once; return what ``apply`` returned, or None if nothing changed."""
        with self._polling:
            return self._poll()

    def _poll(self) -> object:
        try:
            rows = self.store.rows()
        except Exception as e:  # noqa: BLE001 - an outage: keep serving the last good set
            self._set_up(False, _describe(e))
            return None
        self._set_up(True)
        self._saved(rows)
        before = self.clients
        self._take(parse_rows(rows))
        if self.clients == before:
            return None
        try:
            return self.apply(list(self.clients.values()))
        except Exception:  # noqa: BLE001 - a set the runtime refused: say so, poll on
            logger.exception("applying the clients read from Supabase failed")
            return None

    def _take(self, snapshot) -> None:  # noqa: ANN001 - a client_store.Snapshot
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

    def _set_up(self, up: bool, why: str = "") -> None:
        if up:
            self.last_ok = time.monotonic()
        if up != self.up:
            if up:
                logger.warning("client source: Supabase answers again")
            else:
                logger.error("client source: Supabase unreachable (%s); serving the last good clients", why)
        self.up = up
        self.metrics.source_up.set(1 if up else 0)

    def _saved(self, rows: list[dict]) -> None:
        if self.settings.cache_file is not None:
            try:
                save_cache(Path(self.settings.cache_file), rows)
            except OSError as e:
                logger.error("cannot write the client cache file %s: %s", self.settings.cache_file, e.strerror)

    def status(self) -> dict:
        """For the admin's stats: is the source up, since when, and which rows are bad."""
        with self._lock:
            errors = {row_id: f"{e.field}: {e.reason}" for row_id, e in sorted(self.errors.items())}
        age = None if self.last_ok is None else round(time.monotonic() - self.last_ok, 1)
        return {"kind": "supabase", "up": self.up, "last_read_s_ago": age, "bad_rows": errors}


def _describe(error: BaseException) -> str:
    """Type and first line: enough to act on, and no URL query or key (supabase-py puts
    neither in its errors; the text is cut short all the same). PostgREST's own errors
    (``postgrest.APIError``) carry a code and a message: those, not the proxy's HTML."""
    if getattr(error, "code", None) and getattr(error, "message", None):
        return f"{type(error).__name__} {error.code}: {str(error.message)[:160]}"
    return describe(error, 160)
