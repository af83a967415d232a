"""The Runtime: builds the actor tree from settings, reloads it, and takes it down.

Children, started in this order and stopped in the reverse one:
``pool:<client>`` for each client, then ``scaler``, then ``dispatch``. Pool specs read the
client's settings when they (re)start, so a pool restarted after a reload uses the new
settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pykka
from livekit import api

from actors import ChildSpec, Directory, DispatchActor, PoolActor, Restart, ScalerActor, Supervisor, _watch, pool_id
from actors.messages import (
    DrainChildren,
    EndSessions,
    Reconfigure,
    RoomEvent,
    RoomEventKind,
    ShutdownAll,
    StartChild,
    StopChild,
)
from actors.supervisor import ChildGone
from runtime.backends import BackendError, ProcessBackend, WorkerBackend
from runtime.clients.source import SourceWatcher
from runtime.instance import Instance
from runtime.livekit.client import LiveKitClient
from runtime.metrics import Metrics
from runtime.secrets import same_secret
from runtime.sessions.log import SessionLog
from runtime.sessions.owners import Owner, when_sole_sender
from runtime.sessions.shipper import Shipper
from runtime.sessions.store import FILE_NAME, SqliteStore
from runtime.sessions.webhooks import Deliverer
from runtime.settings import ClientSettings, ConfigError, ReloadSummary, Settings, WebhookTarget, load_settings

logger = logging.getLogger("autonomite.runtime")


def make_backend(settings: Settings) -> WorkerBackend:
    workers = settings.runtime.workers
    if settings.runtime.backend == "process":
        return ProcessBackend(log_dir=workers.log_dir, zygote=workers.zygote, isolation=settings.runtime.isolation,
                              state_dir=settings.runtime.state_dir)
    instance = _instance(settings)
    try:
        if settings.runtime.backend == "swarm":
            from runtime.backends.swarm import SwarmBackend  # imported only when used

            return SwarmBackend(workers.log_dir, instance, workers.engine_url, workers.client_uids)
        from runtime.backends.docker import DockerBackend  # imported only when used

        return DockerBackend(workers.log_dir, instance, workers.volumes, workers.client_uids)
    except BackendError:
        # No engine: nothing started. A new id goes; one taken over stays for the next start.
        instance.release(forget=instance.new)
        raise


def _instance(settings: Settings) -> Instance:
    """This runtime's instance id, which labels its containers (runtime/instance.py)."""
    try:
        return Instance.claim(settings.runtime.state_dir)
    except OSError as e:
        raise BackendError(f"runtime.state_dir {settings.runtime.state_dir}: {e.strerror or e}") from None


class Runtime:
    def __init__(self, settings: Settings, config_path: Path | None = None, backend: WorkerBackend | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        # Where a reload finds ``${VAR}``: serve took the config's variables out of os.environ.
        self.environ = environ
        self.metrics = Metrics()
        self.metrics.set_scaler_thresholds(settings.runtime.scaler.high_water, settings.runtime.scaler.low_water)
        self.source: SourceWatcher | None = None
        if settings.clients_source is not None:
            # Clients from Supabase are read before anything is started (the zygote boots in
            # seconds; a docker backend connects to its engine): a start that cannot read
            # them fails in about a second, and leaves nothing to stop.
            self.source = SourceWatcher(settings.clients_source.supabase, self.metrics,
                                        allow_private_webhooks=settings.runtime.webhooks.allow_private)
            self.settings = settings.model_copy(update={"clients": self.source.first_read()})
        self.directory = Directory()
        self.backend = backend or make_backend(settings)
        self.sessions: SessionLog | None = None
        self.shipper: Shipper | None = None
        self.webhooks: Deliverer | None = None
        self.owner: Owner | None = None
        self._senders_lock, self._senders_stopped = threading.Lock(), False
        if settings.runtime.sessions.record:
            self._start_records()
        self.executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="worker-io")
        self.livekit = LiveKitClient()
        self.failure: str | None = None
        self.failed = threading.Event()
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._reload_lock = threading.Lock()
        self._by_token: dict[str, ClientSettings] = {}
        self._index_tokens(self.settings)
        sup = settings.runtime.supervisor
        self.supervisor = Supervisor.start(
            self.directory,
            max_restarts=sup.max_restarts,
            within_s=sup.within_s,
            on_give_up=self._give_up,
            on_restart=lambda child_id: self.metrics.actor_restarts.labels(child_id.split(":")[0]).inc(),
        )

    def _start_records(self) -> None:
        """Every trigger's record, in the state directory (runtime/sessions): no setting
        needed. Each client with a webhook gets its session events; with clients in
        Supabase the records go on to its sessions table. The file is the buffer of both."""
        state_dir = self.settings.runtime.state_dir
        self.owner = Owner(state_dir)  # which open sessions are ours, and which a gone runtime's
        store = SqliteStore(state_dir / FILE_NAME, owner=self.owner.id)
        if self.settings.clients_source is not None:
            self.shipper = Shipper(store.path, self.settings.clients_source.supabase)
        self.webhooks = Deliverer(store.path, self._webhook_of, self.settings.runtime.webhooks, metrics=self.metrics)
        shipper, webhooks = self.shipper, self.webhooks

        def send() -> None:  # once no other runtime on this state directory sends (owners.py)
            with self._senders_lock:
                if self._senders_stopped:
                    return
                if shipper is not None:
                    shipper.start()
                webhooks.start()

        when_sole_sender(state_dir, send)

        def written() -> None:  # the session log's thread: new rows for both to look at
            if shipper is not None:
                shipper.wake()
            webhooks.wake()

        self.sessions = SessionLog(store, self.backend.name, self.metrics, on_written=written,
                                   has_webhook=lambda cid: self._webhook_of(cid) is not None,
                                   alive=self.owner.alive).start()

    def _webhook_of(self, client_id: str) -> WebhookTarget | None:
        """Asked at each event and each delivery: a reload's new URL or secret applies at once."""
        client = self.settings.client(client_id)
        return client.webhook if client is not None else None

    def webhook_stats(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Delivery of each client's session events, for those with a webhook (the admin
        stats; reads SQLite: the gateway calls it in an executor)."""
        if self.webhooks is None:
            return {}
        return {cid: self.webhooks.stats(cid) for cid in client_ids if self._webhook_of(cid) is not None}

    # -- the tree ------------------------------------------------------------------------

    def start(self) -> Runtime:
        """Start a pool for each client that keeps warm workers or has live ones to adopt;
        a client at zero gets its pool on its first trigger (the dispatcher wakes it)."""
        if self.source is not None:
            self.source.start(self.apply_clients)
        live = self._remove_strays()
        if self.sessions is not None:
            self.sessions.close_orphans(live)  # sessions the last runtime left on workers now gone
        with_workers = {client_id for client_id, _ in live}
        started = 0
        for client in self.settings.clients:
            if client.pool.min_idle > 0 or client.id in with_workers:
                self.supervisor.ask(StartChild(self._pool_spec(client.id)))
                started += 1
        self.supervisor.ask(StartChild(self._scaler_spec()))
        self.supervisor.ask(StartChild(self._dispatch_spec()))
        logger.info("runtime started with %d clients (%d pools running, the rest at zero) on the %s backend",
                    len(self.settings.clients), started, self.backend.name)
        return self

    def _remove_strays(self) -> set[tuple[str, str]]:
        """Workers left by an earlier runtime for clients no longer configured go; returns
        the (client, worker) of the live ones (their pools start, to adopt them)."""
        live = set()
        for handle in self.backend.list():
            if self.settings.client(handle.client_id) is None:
                logger.info("removing stray worker %s of unknown client %s", handle.worker_id, handle.client_id)
                self.backend.stop(handle)
            else:
                live.add((handle.client_id, handle.worker_id))
        return live

    def _pool_spec(self, client_id: str) -> ChildSpec:
        def start(**child: Any) -> pykka.ActorRef[Any]:
            client = self.settings.client(client_id)
            if client is None:  # removed since the start was asked for (a reload raced a trigger)
                raise ChildGone(f"client {client_id} is no longer configured")
            return PoolActor.start(
                client, self.backend, self.settings.runtime.workers, self.metrics, self.executor,
                tell_dispatch=self._tell_dispatch, status_key=self.settings.runtime.admin_token.get_secret_value(),
                rest_after_s=self.settings.runtime.scaler.stop_idle_pool_after_s, forget_metrics=self._forget_metrics,
                sessions=self.sessions, **child,
            )

        return ChildSpec(pool_id(client_id), start, Restart.PERMANENT, self.settings.runtime.supervisor.shutdown_timeout_s)

    def _scaler_spec(self) -> ChildSpec:
        def start(**child: Any) -> pykka.ActorRef[Any]:
            return ScalerActor.start(self.directory, self.settings.runtime.scaler, self.metrics, **child)

        return ChildSpec("scaler", start)

    def _dispatch_spec(self) -> ChildSpec:
        def start(**child: Any) -> pykka.ActorRef[Any]:
            return DispatchActor.start(self.directory, self.livekit, self.metrics, self.settings.runtime.dispatch,
                                       wake_pool=self._wake_pool, rest_pool=self._rest_pool, sessions=self.sessions,
                                       **child)

        return ChildSpec("dispatch", start)

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> ReloadSummary:
        """Re-read the config file; raise ConfigError and change nothing if it is bad.

        With a client source the file holds no clients: it is checked, and the source is
        read at once instead of at its next poll."""
        if self.config_path is None:
            raise ConfigError("no config file to reload from")
        with self._reload_lock:
            new = load_settings(self.config_path, None if self.environ is None else {**os.environ, **self.environ})
            if new.clients_source != self.settings.clients_source:
                raise ConfigError(f"{self.config_path}: clients_source: this section changes only with a restart")
            if self.source is None:
                return self.apply(new)
        return self.source.poll_once(whole=True) or ReloadSummary([], [], [])

    def apply_clients(self, clients: list[ClientSettings]) -> ReloadSummary:
        """A new client set from the source (its watcher's thread): the same path as a reload."""
        with self._reload_lock:
            return self.apply(self.settings.model_copy(update={"clients": clients}))

    def apply(self, new: Settings) -> ReloadSummary:
        if new.runtime != self.settings.runtime:
            raise ConfigError(f"{self.config_path}: runtime: this section changes only with a restart")
        summary = ReloadSummary.between(self.settings.clients, new.clients)
        new_clients = {c.id: c for c in new.clients}
        self._index_tokens(new)  # first: a removed or rotated token stops working with the swap
        self.settings = new  # before any (re)start, so new pools read the new settings
        for cid in summary.removed:
            self.supervisor.ask(StopChild(pool_id(cid), graceful=True))  # nothing to do for one at zero
        for cid in summary.added:
            if new_clients[cid].pool.min_idle > 0:  # else its first trigger starts it
                self.supervisor.ask(StartChild(self._pool_spec(cid)))
        for cid in summary.changed:
            if self.directory.get(pool_id(cid)) is not None:
                self._tell_pool(cid, Reconfigure(new_clients[cid]))
            elif new_clients[cid].pool.min_idle > 0:  # a stopped pool reads its settings when it starts
                self.supervisor.ask(StartChild(self._pool_spec(cid)))
        logger.info("reloaded: %s", summary.as_json())
        return summary

    def on_livekit_event(self, client_id: str, event: api.WebhookEvent) -> None:
        """A verified, de-duplicated LiveKit webhook event of this client: a room that ended,
        or a user who left it, ends the session of the worker leased for that room."""
        if event.event == "room_finished" or (
            event.event == "participant_left" and event.participant.kind != api.ParticipantInfo.Kind.AGENT
        ):
            ended: RoomEventKind = "room_finished" if event.event == "room_finished" else "participant_left"
            self._tell_dispatch(RoomEvent(client_id, event.room.name, ended))

    def _wake_pool(self, client_id: str, done: Callable[[bool], None]) -> None:
        """The dispatcher's: start a client's pool for a trigger. Only tells the supervisor
        (this runs on the dispatcher's thread); ``done(ok)`` runs on the supervisor's."""
        if self.settings.client(client_id) is None:  # removed since its trigger came in
            done(False)
            return
        self.supervisor.tell(StartChild(self._pool_spec(client_id), reply=lambda ref: done(ref is not None)))

    def _rest_pool(self, client_id: str, pool: pykka.ActorRef[Any], done: Callable[[bool], None]) -> None:
        """The dispatcher's: stop a pool at rest; it starts again on its client's next trigger.
        Decided again on the supervisor's thread: a reload may have raised the client above
        min_idle 0 meanwhile (it saw the pool running, so it started no other)."""

        def still_at_zero() -> bool:
            client = self.settings.client(client_id)
            return client is not None and client.pool.min_idle == 0

        self.supervisor.tell(StopChild(pool_id(client_id), graceful=True, why="idle", ref=pool,
                                       only_if=still_at_zero, reply=done))

    def _forget_metrics(self, client_id: str) -> None:
        """A pool stopped: its client's series go, unless a new pool of it runs already."""
        if self.directory.get(pool_id(client_id)) is None:
            self.metrics.forget_client(client_id)

    def _tell_dispatch(self, message: object) -> None:
        self._tell(self.directory.get("dispatch"), message)

    def _tell_pool(self, client_id: str, message: object) -> None:
        self._tell(self.directory.get(pool_id(client_id)), message)

    @staticmethod
    def _tell(ref: pykka.ActorRef[Any] | None, message: object) -> None:
        if ref is not None:  # a dead one is restarting: the new incarnation starts from what it finds
            _watch.tell(ref, message)

    # -- drain: a shutdown that lets live sessions finish (runtime/drain.py decides when) --

    def begin_drain(self, on_drained: Callable[[], None]) -> None:
        """Take no new client and no new session: idle and starting workers stop now, leased
        ones keep their sessions. ``on_drained()`` runs, in the supervisor's thread, once the
        last pool has stopped. Waits for the client source's thread: call it off the loop."""
        self.supervisor.tell(DrainChildren(pool_id(""), on_drained))  # from now on no pool starts
        if self.source is not None:
            self.source.stop()

    def end_sessions(self, reason: str) -> None:
        """End every session now; each agent says ``reason`` to its caller first."""
        for ref in self.directory.with_prefix(pool_id(""), draining=True).values():
            self._tell(ref, EndSessions(reason))

    # -- failure and shutdown ------------------------------------------------------------

    def client_by_token(self, token: str) -> ClientSettings | None:
        """The client whose api_token this is. Found by the token's digest (a dict lookup,
        not a walk over thousands of clients), then compared in constant time: how long it
        takes says nothing about which tokens exist."""
        client = self._by_token.get(_digest(token))
        if client is not None and same_secret(token, client.api_token.get_secret_value()):
            return client
        return None

    def _index_tokens(self, settings: Settings) -> None:
        self._by_token = {_digest(c.api_token.get_secret_value()): c for c in settings.clients}

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs, in the supervisor's thread, if the supervisor gives up."""
        self._failure_callbacks.append(callback)
        if self.failure is not None:
            callback(self.failure)

    def _give_up(self, reason: str) -> None:
        self.failure = reason
        self.failed.set()
        for callback in self._failure_callbacks:
            callback(reason)

    def stop(self) -> None:
        if self.source is not None:
            self.source.stop()
        try:
            self.supervisor.ask(ShutdownAll(), timeout=120)
            self.supervisor.stop()
        except Exception as e:  # noqa: BLE001 - the supervisor may be gone already
            logger.debug("supervisor already stopped: %s", e)
        # Starts still in flight finish first (each stops its worker: its pool is gone), then
        # a last sweep takes down anything no pool knew about.
        self.executor.shutdown(wait=True, cancel_futures=True)
        for handle in self.backend.list():
            self.backend.stop(handle)
        self.livekit.close()
        self.backend.close()
        if self.sessions is not None:
            self.sessions.stop()  # what the pools and the dispatcher told it, written
        with self._senders_lock:
            self._senders_stopped = True
        if self.shipper is not None:
            self.shipper.stop()  # what it has not sent stays in the file for the next start
        if self.webhooks is not None:
            self.webhooks.stop()  # the same: pending events go with the next start
        if self.owner is not None:
            self.owner.release()
        logger.info("runtime stopped")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
