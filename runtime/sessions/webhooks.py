"""Session webhooks: each client's ``session.started`` and ``session.ended`` events, signed, POSTed
to the client's ``webhook.url``, retried until delivered or too old.

The events wait in the outbox table of the sessions file (``runtime/sessions/outbox.py``:
its schema, the insert the producer runs in its own transaction, the body's shape). All
state is in that table, so a new ``Deliverer`` on the same file sends what an old one left
pending: delivery is at least once (a request in flight when the runtime dies is sent
again), and the ``Idempotency-Key`` header (the body's ``id``) lets the receiver drop a
repeat.

What a receiver gets::

    POST <url>
    Content-Type: application/json
    User-Agent: autonomite-webhooks
    Idempotency-Key: <session_id>:<event>
    Autonomite-Signature: t=<Unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}." + body)>

and checks it with ``verify`` (or its own copy of it): the signature covers the timestamp,
so a captured request cannot be replayed after ``tolerance_s``. A 2xx answer is delivered;
anything else, a redirect included (never followed), or no answer within
``timeout_s`` is retried after a backoff with full jitter (``retry_base_s`` doubling up to
``retry_max_s``) until ``retry_for_s`` after the event, then the row is ``failed``.

Threads: ``start`` runs one scheduler thread, which reads the due rows (the first of each
client with no request in flight whose session has no earlier pending event) and hands
them to a few sender threads. At most one request per client is in flight, so a client
whose endpoint hangs holds one sender for ``timeout_s`` and delays nobody else's events
(unless as many clients hang at once as there are senders). A sender asks ``target(client)``
for the client's URL and secret at each attempt, so a rotated secret applies at once and a
removed client's events fail ("client has no webhook"); it re-checks the URL (DNS may
have changed since the config was loaded) and connects to the very address it checked.
One SQLite connection, behind a lock, serves both kinds of thread.

Results: counted per client in ``stats`` (this process's counts), in
``metrics.session_webhooks`` (``autonomite_session_webhooks_total{client, outcome}``:
delivered, retried or failed) if a ``Metrics`` is given, and passed to ``on_result(client,
ok)`` once per outcome (ok: delivered). The logs name the client, event, key and HTTP
status (a refused URL: its host and address): never the secret, the URL's path or the body.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import queue
import random
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.metrics import Metrics
from runtime.outbound import Resolved, check_url, resolve
from runtime.sessions import outbox
from runtime.sessions.outbox import OUTBOX_INSERT, OUTBOX_SCHEMA, OutboxEvent, outbox_rows
from runtime.sessions.store import connect
from runtime.settings import WebhookSettings, WebhookTarget

__all__ = ["OUTBOX_INSERT", "OUTBOX_SCHEMA", "Deliverer", "OutboxEvent", "check_url", "outbox_rows", "sign", "verify"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Autonomite-Signature"
POLL_S = 1.0  # a look at the table even unwoken: rows another process inserted
HOUSEKEEPING_S = 1.0  # the queue bound, at most this often
PRUNE_S = 3600.0
KEEP_DELIVERED_S = 86_400.0
KEEP_FAILED_S = 7 * 86_400.0  # long enough for an operator to look into them
READ_LIMIT = 64 * 1024  # of a response body, which is read only to free the connection


# -- signing -------------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300, now: float | None = None) -> bool:
    """The receiver's check: a v1 signature of this body by this secret, at most ``tolerance_s``
    away from now. Several ``v1`` may be given (a sender between two secrets)."""
    now = time.time() if now is None else now
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            macs.append(value)
    if timestamp is None or not macs or abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    ok = False
    for mac in macs:  # every one compared: the time taken says nothing of which matched
        ok |= hmac.compare_digest(mac.encode(), expected.encode())
    return ok


# -- sending ---------------------------------------------------------------------------------------


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the checked address, whatever the name resolves to now."""

    def __init__(self, to: Resolved, timeout: float) -> None:
        super().__init__(to.host, to.port, timeout=timeout)
        self._address = to.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked address; the certificate is checked against the URL's host name."""

    def __init__(self, to: Resolved, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(to.host, to.port, timeout=timeout, context=self._tls)
        self._address = to.address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def post(to: Resolved, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """One POST; its HTTP status. Raises OSError or HTTPException if there is no answer."""
    conn = (_PinnedHTTPS if to.scheme == "https" else _PinnedHTTP)(to, timeout)
    try:
        conn.request("POST", to.target, body=body, headers=headers)
        response = conn.getresponse()
        response.read(READ_LIMIT)
        return response.status
    finally:
        conn.close()


def headers_for(target: WebhookTarget, key: str, body: bytes, now: float) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "autonomite-webhooks",
        "Idempotency-Key": key,
        SIGNATURE_HEADER: sign(target.secret.get_secret_value(), body, int(now)),
    }


# -- the deliverer -----------------------------------------------------------------------------------


class Deliverer:
    def __init__(self, path: Path, target: Callable[[str], WebhookTarget | None], settings: WebhookSettings,
                 on_result: Callable[[str, bool], None] = lambda client, ok: None, metrics: Metrics | None = None,
                 senders: int = 8) -> None:
        self.path, self.settings = path, settings
        self._target, self._on_result, self._metrics = target, on_result, metrics
        self._senders = senders
        self._db_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # once started; None again once stopped
        self._cond = threading.Condition()  # guards _busy, _woken, _stopping, the counts
        self._busy: dict[str, int] = {}  # client -> the seq of its request in flight
        self._woken = self._stopping = False
        self._counts: dict[str, dict[str, Any]] = {}
        self._queue: queue.SimpleQueue[outbox.Row | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        db = connect(self.path)
        db.executescript(OUTBOX_SCHEMA)
        self._db = db
        self._threads = [threading.Thread(target=self._schedule, name="webhooks", daemon=True)] + [
            threading.Thread(target=self._send_loop, name=f"webhooks-{i}", daemon=True) for i in range(self._senders)]
        for t in self._threads:
            t.start()

    def wake(self) -> None:
        """New rows were inserted: look now, not at the next poll."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop within ``timeout``: a request still in flight then is left to its (daemon)
        thread and its row stays pending, sent again by the next Deliverer."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for _ in range(self._senders):
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def stats(self, client: str) -> dict[str, Any]:
        with self._db_lock:
            pending = outbox.pending(self._db, client) if self._db is not None else None
        with self._cond:
            counts = dict(self._counts.get(client, {}))
        return {"pending": pending, "delivered_total": counts.get("delivered", 0),
                "failed_total": counts.get("failed", 0), "last_error": counts.get("last_error")}

    # -- the scheduler's thread -------------------------------------------------------------------

    def _schedule(self) -> None:
        housekept = pruned = 0.0
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._woken = False
                busy = set(self._busy)
            now = time.time()
            try:
                with self._db_lock:
                    if self._db is None:
                        return
                    if now - housekept >= HOUSEKEEPING_S:
                        housekept = now
                        spare = set(self._busy_seqs())
                        for client, n in outbox.overflow(self._db, self.settings.max_pending_per_client, now, spare).items():
                            log.warning("webhooks: client=%s queue full: %d oldest events failed", client, n)
                            for _ in range(n):
                                self._count(client, "failed", "queue full")
                    if now - pruned >= PRUNE_S:
                        pruned = now
                        outbox.prune(self._db, now - KEEP_DELIVERED_S, now - KEEP_FAILED_S)
                    rows = outbox.due(self._db, now, busy)
                    next_at = outbox.next_due(self._db, now)
            except Exception:  # a locked or broken file: look again at the next poll
                log.exception("webhooks: reading the outbox failed")
                rows, next_at = [], None
            with self._cond:
                for row in rows:
                    if row.client not in self._busy:
                        self._busy[row.client] = row.seq
                        self._queue.put(row)
                wait = POLL_S if next_at is None else min(POLL_S, max(0.0, next_at - time.time()))
                if not self._woken and not self._stopping:
                    self._cond.wait(wait)

    def _busy_seqs(self) -> list[int]:
        with self._cond:
            return list(self._busy.values())

    # -- the senders' threads -------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while (row := self._queue.get()) is not None:
            try:
                self._deliver(row)
            except Exception as e:  # a bug: counted as a failed attempt, so not retried at once
                log.exception("webhooks: client=%s key=%s delivery crashed", row.client, row.key)
                try:
                    self._attempt_failed(row, f"crashed ({type(e).__name__})")
                except Exception:
                    log.exception("webhooks: client=%s key=%s recording a crash failed", row.client, row.key)
            finally:
                with self._cond:
                    self._busy.pop(row.client, None)
                    self._woken = True
                    self._cond.notify_all()

    def _deliver(self, row: outbox.Row) -> None:
        target = self._target(row.client)
        if target is None:  # removed, or new to this runtime (a rolling restart's old one sends
            self._attempt_failed(row, "client has no webhook")  # until it exits): retried, in time given up
            return
        body, status, error = row.body.encode(), None, None
        try:
            to = resolve(target.url, self.settings.allow_private)
        except ValueError as e:
            error = f"refused: {e}"
        else:
            try:
                status = post(to, body, headers_for(target, row.key, body, time.time()), self.settings.timeout_s)
            except (OSError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
        if error is not None:
            self._attempt_failed(row, error)
            return
        with self._db_lock:
            if self._db is None:
                return
            outbox.delivered(self._db, row.seq, time.time())
        log.info("webhooks: client=%s event=%s key=%s delivered (HTTP %s, attempt %d)",
                 row.client, row.event, row.key, status, row.attempts + 1)
        self._count(row.client, "delivered", None)

    def _attempt_failed(self, row: outbox.Row, error: str) -> None:
        """Retry later, or give up once ``retry_for_s`` has passed since the event."""
        now, attempt = time.time(), row.attempts + 1
        deadline = row.created_at + self.settings.retry_for_s
        if now >= deadline:
            self._give_up(row, error, attempted=True)
            return
        ceiling = min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** min(attempt - 1, 60))
        next_at = min(now + random.uniform(0, ceiling), deadline)
        with self._db_lock:
            if self._db is None or not outbox.retry(self._db, row.seq, error, next_at):
                return
        log.info("webhooks: client=%s event=%s key=%s attempt %d failed (%s); retry in %.1f s",
                 row.client, row.event, row.key, attempt, error, next_at - now)
        self._count(row.client, "retried", error)

    def _give_up(self, row: outbox.Row, error: str, attempted: bool) -> None:
        with self._db_lock:
            if self._db is None or not outbox.failed(self._db, row.seq, error, time.time(), attempted):
                return
        log.warning("webhooks: client=%s event=%s key=%s failed: %s", row.client, row.event, row.key, error)
        self._count(row.client, "failed", error)

    def _count(self, client: str, outcome: str, error: str | None) -> None:
        with self._cond:
            counts = self._counts.setdefault(client, {})
            counts[outcome] = counts.get(outcome, 0) + 1
            if error is not None:
                counts["last_error"] = error
        if self._metrics is not None:
            self._metrics.session_webhooks.labels(client, outcome).inc()
        self._on_result(client, outcome == "delivered")
