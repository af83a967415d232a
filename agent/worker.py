"""The program inside one warm worker: register with LiveKit, serve one session, exit.

A worker belongs to one client and knows only that client's credentials and agent
catalog, all read from its environment (livekit-agents writes credentials into
``os.environ`` anyway, which is why one worker is one OS process). It registers under a
name unique to it, so a dispatch to that name reaches exactly this worker.

It serves a small status endpoint on its own port, because the runtime must know when
the worker is *registered* (LiveKit drops dispatches to names nobody registered) and the
health server built into livekit-agents does not say so.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from agent.lifeline import outlive_runtime, watch_lifeline
from agent.status import ReportedState

logger = logging.getLogger("autonomite.agent")

DRAIN_TIMEOUT_S = 8  # a stopped worker lets its session wrap up this long, then goes
CLAIM_TIMEOUT_S = 30.0  # claimed and no job by then: the runtime lost track of it; exit
FLAG_CHECK_S = 0.5  # how often a status long poll looks at the LiveKit connection flag


@dataclass
class WorkerConfig:
    """What the runtime tells a worker through its environment (besides LiveKit's own
    ``LIVEKIT_URL``/``_API_KEY``/``_API_SECRET``). ``to_env`` and ``from_env`` are the two
    ends of that contract, kept side by side."""

    worker_id: str
    client_id: str
    agent_name: str
    status_port: int
    catalog: list[dict]
    user_join_timeout_s: float = 120.0
    rejoin_grace_s: float = 10.0  # runtime.settings.WorkerSettings.rejoin_grace_s
    status_host: str = "127.0.0.1"  # where the status port listens (another node's runtime probes it)
    status_token: str = field(default="", repr=False)  # every status call must carry it
    orphan_timeout_s: float = 300.0  # in session, no runtime following it this long: end (agent/orphan.py)

    def to_env(self) -> dict[str, str]:
        return {
            "AUTONOMITE_STATUS_HOST": self.status_host,
            "AUTONOMITE_STATUS_TOKEN": self.status_token,
            "AUTONOMITE_WORKER_ID": self.worker_id,
            "AUTONOMITE_CLIENT_ID": self.client_id,
            "AUTONOMITE_AGENT_NAME": self.agent_name,
            "AUTONOMITE_STATUS_PORT": str(self.status_port),
            "AUTONOMITE_CATALOG": json.dumps(self.catalog),
            "AUTONOMITE_USER_JOIN_TIMEOUT_S": str(self.user_join_timeout_s),
            "AUTONOMITE_ORPHAN_TIMEOUT_S": str(self.orphan_timeout_s),
            "AUTONOMITE_REJOIN_GRACE_S": str(self.rejoin_grace_s),
        }

    @classmethod
    def from_env(cls) -> WorkerConfig:
        return cls(
            worker_id=os.environ["AUTONOMITE_WORKER_ID"],
            client_id=os.environ["AUTONOMITE_CLIENT_ID"],
            agent_name=os.environ["AUTONOMITE_AGENT_NAME"],
            status_port=int(os.environ["AUTONOMITE_STATUS_PORT"]),
            catalog=json.loads(os.environ.get("AUTONOMITE_CATALOG", "[]")),
            user_join_timeout_s=float(os.environ.get("AUTONOMITE_USER_JOIN_TIMEOUT_S", "120")),
            rejoin_grace_s=float(os.environ.get("AUTONOMITE_REJOIN_GRACE_S", "10")),
            status_host=os.environ.get("AUTONOMITE_STATUS_HOST", "127.0.0.1"),
            status_token=os.environ.get("AUTONOMITE_STATUS_TOKEN", ""),
            orphan_timeout_s=float(os.environ.get("AUTONOMITE_ORPHAN_TIMEOUT_S", "300")),
        )


class WorkerState:
    """What this worker says about itself on its status port, and its end of the lease protocol.

    ``starting -> idle -> claimed -> busy -> draining``. The runtime *claims* an idle worker
    (with a lease id) before it creates the LiveKit dispatch, and the worker accepts only a
    job whose metadata carries that lease id. So the lease is recorded here, in the worker,
    and outlives a crashed pool actor: a restarted pool sees ``claimed`` or ``busy`` and
    never leases the worker again. Owned by the worker's main event loop.
    """

    def __init__(self, config: WorkerConfig, is_connected: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.changed = asyncio.Event()  # set on every state change: wakes the status long polls
        self._state: ReportedState = "starting"
        self.lease_id: str | None = None
        self.accepted_job: str | None = None
        self.job_accepted = asyncio.Event()
        self.assignment_failed = False
        self.claimed_at = 0.0
        self.end_session: Callable[[str, bool, bool], None] | None = None  # set once a job runs
        self.is_connected = is_connected  # set to the LiveKit connection once the server exists
        self.runtime_gone = False  # the runtime that started it died: never claimed again
        self.heard_at = time.monotonic()  # the last authenticated status call: a runtime follows us

    @property
    def state(self) -> ReportedState:
        return self._state

    @state.setter
    def state(self, value: ReportedState) -> None:
        self._state = value
        self.changed.set()

    def etag(self) -> str:
        """Names what the runtime follows: a status long poll answers when it changes."""
        return f"{self.state}:{int(self.registered)}:{self.lease_id or ''}"

    async def changed_from(self, etag: str, wait: float) -> None:
        """Return once the status differs from ``etag``, or after ``wait`` seconds. State
        changes wake it at once; a lost LiveKit connection (a flag, no event) within
        ``FLAG_CHECK_S``: each idle worker wakes twice a second for that, and no more."""
        deadline = time.monotonic() + wait
        while self.etag() == etag and (remaining := deadline - time.monotonic()) > 0:
            self.changed.clear()
            try:
                async with asyncio.timeout(min(remaining, FLAG_CHECK_S)):
                    await self.changed.wait()
            except TimeoutError:
                pass

    @property
    def registered(self) -> bool:
        """Registered with LiveKit *now*: false from the moment its connection drops."""
        return self.state != "starting" and self.is_connected()

    def claim(self, lease_id: str, worker_id: str) -> bool:
        """``worker_id``: the runtime means this worker (a status port reused by another
        worker must not be claimed by mistake)."""
        if (self.state != "idle" or not self.registered or worker_id != self.config.worker_id or not lease_id
                or self.runtime_gone):
            return False
        self.state, self.lease_id = "claimed", lease_id
        self.claimed_at = time.monotonic()
        return True

    def release(self, lease_id: str) -> bool:
        """The dispatch failed before any job: serve the next lease instead."""
        if self.state != "claimed" or self.lease_id != lease_id or self.accepted_job:
            return False
        self.state, self.lease_id = "idle", None
        return True

    def accept(self, job_id: str, lease_id: str | None) -> bool:
        """One job, and only the one dispatched for this worker's current lease. The runtime
        hears of it (``job_accepted``) only once LiveKit assigned it: see ``assigned``."""
        if self.state != "claimed" or self.accepted_job is not None or lease_id != self.lease_id:
            return False
        self.state, self.accepted_job = "busy", job_id
        return True

    def assigned(self, ok: bool) -> None:
        """LiveKit assigned the accepted job (or did not: then /job answers no)."""
        self.assignment_failed = not ok
        self.job_accepted.set()

    def claim_expired(self, now: float) -> bool:
        return self.state == "claimed" and now - self.claimed_at > CLAIM_TIMEOUT_S

    def load(self) -> float:
        """What LiveKit is told: free until the job is taken, full afterwards. Not the
        machine's CPU, which LiveKit compares with its 0.7 threshold and then drops our
        dispatch; and not full while merely claimed, or a status report between the claim
        and the job request would turn that very job away."""
        return 1.0 if self.state in ("busy", "draining") else 0.0

    def as_json(self) -> dict:
        return {
            "worker_id": self.config.worker_id,
            "client_id": self.config.client_id,
            "agent_name": self.config.agent_name,
            "state": self.state,
            "registered": self.registered,
            "lease_id": self.lease_id,
            "job_id": self.accepted_job,
            "etag": self.etag(),
        }


async def _serve_status(state: WorkerState) -> web.AppRunner:
    """The runtime's window into this worker: on loopback unless the runtime says otherwise
    (a worker on another node), and only for callers with this worker's token."""

    async def status(request: web.Request) -> web.Response:
        """With ``since=<etag>&wait=S``, a long poll: answers when the status is no longer
        ``since``, or after S seconds. The runtime follows each worker this way, so a
        change reaches it at once while an unchanged worker costs one request per S."""
        since = request.query.get("since")
        if since:
            try:
                wait = min(max(float(request.query.get("wait", "0") or 0), 0.0), 30.0)
            except ValueError:
                return web.json_response(state.as_json(), status=400)
            await state.changed_from(since, wait)
        return web.json_response(state.as_json())

    async def claim(request: web.Request) -> web.Response:
        ok = state.claim(request.query.get("lease_id", ""), request.query.get("worker_id", ""))
        return web.json_response(state.as_json(), status=200 if ok else 409)

    async def release(request: web.Request) -> web.Response:
        ok = state.release(request.query.get("lease_id", ""))
        return web.json_response(state.as_json(), status=200 if ok else 409)

    async def job(request: web.Request) -> web.Response:
        """Long poll: answers as soon as this lease's job is accepted, or at ``wait``."""
        try:
            wait = min(max(float(request.query.get("wait", "0") or 0), 0.0), 60.0)
        except ValueError:
            return web.json_response(state.as_json(), status=400)
        try:
            await asyncio.wait_for(state.job_accepted.wait(), wait)
        except TimeoutError:
            pass
        ok = (state.job_accepted.is_set() and not state.assignment_failed
              and state.lease_id == request.query.get("lease_id"))
        return web.json_response(state.as_json(), status=200 if ok else 409)

    async def end(request: web.Request) -> web.Response:
        """The room ended (a LiveKit webhook), or the runtime is shutting down: end the
        session now. With ``say=1`` the agent says ``reason`` to the caller first."""
        if state.end_session is None:
            return web.json_response(state.as_json(), status=409)
        try:
            say = request.query.get("say") == "1"
            state.end_session(request.query.get("reason", "ended by the runtime")[:500 if say else 100],
                              request.query.get("if_no_users") == "1", say)
        except RuntimeError:  # the job's loop is closed: the session is over already
            return web.json_response(state.as_json(), status=409)
        return web.json_response(state.as_json())

    @web.middleware
    async def authenticated(request: web.Request, handler):  # noqa: ANN001, ANN202
        token = state.config.status_token
        given = request.headers.get("Authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "unauthorized", "detail": "a valid worker token is required"}, status=401)
        state.heard_at = time.monotonic()
        return await handler(request)

    app = web.Application(middlewares=[authenticated])
    app.router.add_get("/status", status)
    app.router.add_post("/claim", claim)
    app.router.add_post("/release", release)
    app.router.add_get("/job", job)
    app.router.add_post("/end", end)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, state.config.status_host, state.config.status_port).start()
    return runner


async def run_worker(config: WorkerConfig) -> int:
    from livekit.agents import AgentServer, JobContext, JobExecutorType, JobRequest

    from agent import providers
    from agent.last_words import say_then_end
    from agent.rag import KnowledgeBase
    from agent.session import end_session, run_session

    state = WorkerState(config)
    # livekit-agents' job-runner warm-up loads local VAD and end-of-turn models (~250 MB)
    # into every worker. Only cloud speech input uses them (its turns end by that model):
    # text-only and offline voice catalogs skip them (offline turns end on silero's VAD).
    if not any((agent.get("stt") or {}).get("provider", "offline") != "offline" for agent in config.catalog):
        os.environ.setdefault("LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE", "0")
    # Everything a session needs is ready before the worker registers (and so reports idle):
    # the client's documents indexed, the configured provider plugins imported.
    knowledge_dir, knowledge_fd = os.environ.get("AUTONOMITE_KNOWLEDGE_DIR"), os.environ.get("AUTONOMITE_KNOWLEDGE_FD")
    knowledge = (KnowledgeBase.from_fd(int(knowledge_fd)) if knowledge_fd
                 else KnowledgeBase.from_dir(Path(knowledge_dir)) if knowledge_dir else None)
    providers.preload(config.catalog, knowledge.passages if knowledge else None)
    loop = asyncio.get_running_loop()
    session_over = asyncio.Event()
    stop_requested = asyncio.Event()

    server = AgentServer(
        # One job per worker, so a thread is isolation enough, and it is already warm.
        job_executor_type=JobExecutorType.THREAD,
        num_idle_processes=1,
        host="127.0.0.1",
        port=0,  # the built-in health server; ours is the status port
        load_threshold=float("inf"),
        load_fnc=state.load,
    )
    # livekit-agents keeps no public flag for "connected right now"; ``_connecting`` is set
    # for as long as it (re)connects (checked in livekit-agents 1.8, pinned below 1.9).
    state.is_connected = lambda: not server._connecting  # noqa: SLF001 - see above

    async def on_request(req: JobRequest) -> None:
        # A second dispatch to this name (a crashed lease book, a retried request) must
        # never put a second end user into the same worker.
        # Only the job dispatched for the current lease is taken: not a stale dispatch from
        # a lease that was returned, nor a second one.
        if not state.accept(req.id, _lease_of(req.job.metadata)):
            logger.warning("rejecting job %s: not the job of this worker's lease (state %s)", req.id, state.state)
            await req.reject()
            return
        try:  # returns once LiveKit assigned the job to us: only then may the runtime say 200
            await req.accept(identity=f"agent-{config.worker_id}")
        except BaseException:
            state.assigned(False)
            raise
        state.assigned(True)

    @server.rtc_session(agent_name=config.agent_name, on_request=on_request)
    async def entry(ctx: JobContext) -> None:
        async def on_shutdown(reason: str) -> None:
            logger.info("session over: %s", reason)
            # Shutdown callbacks run on the job's loop; the event belongs to ours.
            loop.call_soon_threadsafe(session_over.set)

        ctx.add_shutdown_callback(on_shutdown)
        # The job runs on a loop of its own (thread executor); /end reaches it through here.
        job_loop, entry_task = asyncio.get_running_loop(), asyncio.current_task()
        state.end_session = lambda reason, if_no_users, say=False: job_loop.call_soon_threadsafe(
            *(say_then_end, ctx, entry_task, reason) if say else (end_session, ctx, entry_task, reason, if_no_users)
        )
        await run_session(ctx, config.catalog, knowledge, config.user_join_timeout_s, config.rejoin_grace_s)

    server.on("worker_registered", lambda *_: _mark_idle(state))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)

    async def job_gone() -> None:
        """Backstop for a job that died without its shutdown callback (a crashed runner),
        and for a claim whose job never came (the runtime that claimed us lost track)."""
        while not (state.job_accepted.is_set() and not server.active_jobs):
            if state.claim_expired(time.monotonic()):
                logger.warning("claimed %g s ago and no job came; ending this worker", CLAIM_TIMEOUT_S)
                return
            await asyncio.sleep(1.0)
        await asyncio.sleep(5.0)  # an accepted job shows up in active_jobs within moments
        while server.active_jobs:
            await asyncio.sleep(1.0)
        logger.warning("job %s is no longer running; ending this worker", state.accepted_job)

    runtime_gone = watch_lifeline(loop, state)
    status_runner = await _serve_status(state)
    run_task = asyncio.create_task(server.run(devmode=False))
    waiters = [asyncio.create_task(e.wait()) for e in (session_over, stop_requested)]
    waiters += [asyncio.create_task(job_gone()), asyncio.create_task(outlive_runtime(state, runtime_gone))]
    done, _ = await asyncio.wait([run_task, *waiters], return_when=asyncio.FIRST_COMPLETED)

    exit_code = 0
    if run_task in done:
        exc = run_task.exception()
        logger.error("worker stopped unexpectedly: %s", exc)
        exit_code = 1
    else:
        state.state = "draining"
        if stop_requested.is_set() or state.runtime_gone:
            _exit_hard_after(DRAIN_TIMEOUT_S + 5)  # whoever stopped us may not be there to kill us
        try:
            await server.drain(timeout=DRAIN_TIMEOUT_S)
        except TimeoutError:
            logger.warning("session did not end within %d s of the drain; closing anyway", DRAIN_TIMEOUT_S)
    await server.aclose()
    for t in waiters:
        t.cancel()
    await status_runner.cleanup()
    logger.info("worker %s exits with %d", config.worker_id, exit_code)
    return exit_code


def _lease_of(metadata: str) -> str | None:
    try:
        value = json.loads(metadata or "{}").get("lease_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _exit_hard_after(seconds: float) -> None:
    def exit_now() -> None:
        logger.error("worker did not close within %g s of SIGTERM; exiting hard", seconds)
        os._exit(3)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


def _mark_idle(state: WorkerState) -> None:
    if state.state == "starting":
        state.state = "idle"
        logger.info("registered as %s", state.config.agent_name)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    from agent.boot import boot

    boot()  # no new privileges; on swarm, the settings out of their secret file
    config = WorkerConfig.from_env()
    from agent.providers import ProviderError

    try:
        sys.exit(asyncio.run(run_worker(config)))
    except ProviderError as e:  # before registering: the pool backs off and shows the exit
        logger.error("cannot start: %s", e)
        sys.exit(3)
