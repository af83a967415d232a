"""``serve``'s event loop: the gateway's listeners, the signals, and the way down.

Up: the gateway (and the metrics listener, if configured) binds its address with
SO_REUSEPORT (``runtime/http/listeners.py``). If another runtime already listens there, this is a
rolling restart: this one listens beside it only once it is ready, and with ``--replace``
then sends it SIGTERM. Ready, it tells systemd (``READY=1``).

Down: signals, ``POST /api/v1/admin/shutdown``, the drain's deadlines and the runtime's
"drained" all arrive as events on one queue; :class:`runtime.drain.DrainPolicy` decides and
this loop applies its actions. While draining, the gateway keeps listening (a trigger gets
503 ``draining``) until another runtime listens on the address; then it stops listening,
so new connections reach that one, and keeps serving the connections it has.
Nothing here blocks the loop: actor work goes through messages, file and /proc reads
through the executor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from runtime.drain import BeginDrain, DrainPolicy, EndSessions, Stop
from runtime.http import listeners

if TYPE_CHECKING:
    from runtime.http.gateway import Lifecycle
    from runtime.server.app import Runtime
    from runtime.server.signals import Signals
    from runtime.settings import Settings

logger = logging.getLogger("autonomite")

PEER_CHECK_S = 0.25  # how often a draining runtime looks for one listening beside it
READY_CHECK_S = 0.25
STILL_WARMING_LOG_S = 30.0
HANDSHAKES_S = 0.1  # connections whose handshake began before the steering land within this
LET_GO_S = 1.0  # the longest a listener waits for its accept queue to empty before it closes
LAST_ANSWERS_S = 2.0  # at exit: connections get their answer (Connection: close) before the rest is cut


@dataclass
class Listener:
    """One of ``serve``'s HTTP listeners: bound at start, listening once it may."""

    name: str
    host: str
    port: int
    socks: list[socket.socket]
    runner: web.AppRunner | None = None
    sites: list[web.SockSite] = field(default_factory=list)

    async def start(self) -> None:
        for sock in self.socks:
            assert self.runner is not None, "set up before it starts"
            site = web.SockSite(self.runner, sock)
            await site.start()
            self.sites.append(site)
        logger.info("%s listening on http://%s:%d", self.name, self.host, self.port)

    async def stop_listening(self) -> None:
        """No new connections. The ones it has stay: each closes after its next answer
        (``Connection: close`` while draining) or when idle past the header timeout.
        Closing an idle one here could drop a request already on its way."""
        sites, self.sites = self.sites, []  # taken first: a hand-over and the exit may both get here
        for site in sites:
            await site.stop()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class CannotListen(Exception):
    """An address cannot be bound; the message says which and why, in one line."""


def bind_all(settings: Settings) -> list[Listener]:
    """Bind the gateway (first) and the metrics listener, before anything else starts: an
    address held by another program stops ``serve`` before any worker exists."""
    rt = settings.runtime
    wanted = [("gateway", rt.gateway.host, rt.gateway.port)]
    if rt.metrics is not None:
        wanted.append(("metrics", rt.metrics.host, rt.metrics.port))
    bound: list[Listener] = []
    for name, host, port in wanted:
        try:
            bound.append(Listener(name, host, port, listeners.bind(host, port)))
        except OSError as e:
            for listener in bound:
                listener.close()
            raise CannotListen(f"cannot listen for the {name} on {host}:{port}: {e.strerror or e}") from None
    return bound


async def serve_http(runtime: Runtime, all_listeners: list[Listener], signals: Signals, beside: bool,
                     replace: bool = False) -> None:
    """Serve until a shutdown completes. ``beside``: another runtime listens on the gateway's
    address, so listen only once ready (a rolling restart)."""
    from runtime.http.gateway import LIFECYCLE, create_runner
    from runtime.http.metrics_listener import create_metrics_runner

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[str] = asyncio.Queue()
    gateway = all_listeners[0]
    gateway.runner = create_runner(runtime)
    for listener in all_listeners[1:]:
        listener.runner = create_metrics_runner(runtime)
    lifecycle = gateway.runner.app[LIFECYCLE]
    lifecycle.request = events.put_nowait

    stop_asked = False  # a SIGHUP right after a SIGTERM (one read) must not start a reload

    def on_signal(sig: signal.Signals) -> None:
        nonlocal stop_asked
        if sig == signal.SIGHUP:
            _reload(loop, runtime, lifecycle.draining or stop_asked)
        else:
            stop_asked = True
            events.put_nowait(sig.name)

    signals.attach(loop, on_signal)
    # The supervisor gives up in its own thread; wake the loop from there.
    runtime.on_failure(lambda reason: _wake(loop, events, "failed"))
    tasks: list[asyncio.Task[Any]] = []
    try:
        for listener in all_listeners:
            assert listener.runner is not None
            await listener.runner.setup()
        if beside:
            logger.info("another runtime listens on %s:%d: warming up before listening beside it (rolling restart)",
                        gateway.host, gateway.port)
        else:
            for listener in all_listeners:
                await listener.start()
        tasks.append(asyncio.create_task(_when_ready(runtime, all_listeners, lifecycle, beside, replace)))
        await _until_stopped(runtime, events, all_listeners, lifecycle, tasks)
    finally:
        signals.way_down()  # from here a signal must not cut it short and strand workers
        for task in tasks:
            task.cancel()
        lifecycle.draining = True  # the last answers close their connections
        await _hand_over(all_listeners)
        await _last_answers(all_listeners)
        for listener in all_listeners:
            if listener.runner is not None:
                await listener.runner.cleanup()
            listener.close()


async def _until_stopped(runtime: Runtime, events: asyncio.Queue[str], all_listeners: list[Listener],
                         lifecycle: Lifecycle, tasks: list[asyncio.Task[Any]]) -> None:
    loop = asyncio.get_running_loop()
    policy = DrainPolicy(runtime.settings.runtime.shutdown.drain_timeout_s)
    begun: asyncio.Future[Any] | None = None
    while True:
        timeout = None if policy.deadline is None else max(0.0, policy.deadline - loop.time())
        try:
            event = await asyncio.wait_for(events.get(), timeout)
        except TimeoutError:
            actions = policy.tick(loop.time())
        else:
            if event == "failed":
                logger.info("shutting down: the supervisor gave up")
                return
            if event == "drained":
                actions = policy.drained(loop.time())
            else:
                actions = policy.request(event, loop.time())  # type: ignore[arg-type]
                if not actions:
                    logger.warning("%s: already shutting down; please wait", event)
        for why in dict.fromkeys(action.why for action in actions):
            logger.warning("shutdown: %s", why)
        for action in actions:
            match action:
                case BeginDrain():
                    lifecycle.draining = True
                    listeners.sd_notify("STOPPING=1")
                    drained = functools.partial(_wake, loop, events, "drained")
                    begun = loop.run_in_executor(None, runtime.begin_drain, drained)
                    tasks.append(asyncio.create_task(_give_way(all_listeners)))
                    await _log_sessions(runtime)
                case EndSessions():
                    runtime.end_sessions(runtime.settings.runtime.shutdown.end_message)
                case Stop():
                    if begun is not None:
                        await begun
                    return


async def _log_sessions(runtime: Runtime) -> None:
    from runtime.http.gateway import pool_stats

    stats = await pool_stats(runtime)
    logger.info("draining: %d sessions in progress", sum(s.leased for s in stats.values()))


async def _give_way(all_listeners: list[Listener]) -> None:
    """Draining: once another runtime listens on the gateway's address, hand the address
    over to it. Until then keep answering (503 ``draining``)."""
    loop = asyncio.get_running_loop()
    gateway = all_listeners[0]
    while not gateway.sites or not await loop.run_in_executor(None, listeners.others_listening, gateway.socks):
        await asyncio.sleep(PEER_CHECK_S)
    await _hand_over(all_listeners)
    logger.info("another runtime listens on %s:%d: stopped listening; the sessions in progress finish here",
                gateway.host, gateway.port)


async def _hand_over(all_listeners: list[Listener]) -> None:
    """Stop listening without dropping a connection: new ones go to the runtime beside us
    (if any), the ones the kernel queued for us are accepted, then the listeners close."""
    loop = asyncio.get_running_loop()
    socks = [sock for listener in all_listeners if listener.sites for sock in listener.socks]
    if not socks:
        return
    listeners.steer_to_newest(socks)
    deadline = loop.time() + LET_GO_S
    await asyncio.sleep(HANDSHAKES_S)
    while await loop.run_in_executor(None, listeners.queued, socks) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for listener in all_listeners:
        await listener.stop_listening()


async def _last_answers(all_listeners: list[Listener]) -> None:
    """Before the connections are cut: those with a request on its way get their answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LAST_ANSWERS_S
    runners = [listener.runner for listener in all_listeners if listener.runner is not None]
    while loop.time() < deadline and any(r.server is not None and r.server.connections for r in runners):
        await asyncio.sleep(0.05)


async def _when_ready(runtime: Runtime, all_listeners: list[Listener], lifecycle: Lifecycle, beside: bool,
                      replace: bool) -> None:
    """Once every pool is warm: listen beside the other runtime (a rolling start), tell
    systemd, and with ``--replace`` send the other runtime SIGTERM so that it drains."""
    from runtime.http.gateway import warming

    loop = asyncio.get_running_loop()
    logged_at = loop.time()
    while (waiting := await warming(runtime)) is not None:
        if beside and not await loop.run_in_executor(None, listeners.others_listening, all_listeners[0].socks):
            logger.info("the other runtime stopped listening: listening now, still warming")
            for listener in all_listeners:  # better a warming runtime than none on the address
                await listener.start()
            beside = False
        if beside and loop.time() - logged_at > STILL_WARMING_LOG_S:
            logger.info("still warming (%s); not listening beside the other runtime yet",
                        f"{len(waiting)} clients below min_idle" if waiting else "the zygote boots")
            logged_at = loop.time()
        await asyncio.sleep(READY_CHECK_S)
    if lifecycle.draining:
        return
    gateway = all_listeners[0]
    others = await loop.run_in_executor(None, listeners.others_listening, gateway.socks) if beside else set()
    if beside:
        for listener in all_listeners:
            await listener.start()
    logger.info("ready: every pool is warm")
    listeners.sd_notify("READY=1")
    if replace and others:
        for pid in await loop.run_in_executor(None, listeners.owners, others):
            logger.warning("--replace: sending SIGTERM to the runtime (pid %d) on %s:%d; it drains", pid,
                           gateway.host, gateway.port)
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError as e:
                logger.error("--replace: cannot signal pid %d: %s", pid, e.strerror)


def _reload(loop: asyncio.AbstractEventLoop, runtime: Runtime, draining: bool) -> None:
    from runtime.settings import ConfigError

    if draining:
        logger.warning("SIGHUP ignored: draining")
        return

    def run() -> None:
        try:
            runtime.reload()
        except ConfigError as e:
            logger.error("reload on SIGHUP refused, nothing changed: %s", e)

    loop.run_in_executor(None, run)


def _wake(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[str], event: str) -> None:
    """Put ``event`` on the loop's queue from any thread (the supervisor's, an executor's)."""
    loop.call_soon_threadsafe(events.put_nowait, event)
