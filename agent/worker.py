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
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

logger = logging.getLogger("autonomite.agent")

DRAIN_TIMEOUT_S = 8  # a stopped worker lets its session wrap up this long, then goes


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

    def to_env(self) -> dict[str, str]:
        return {
            "AUTONOMITE_WORKER_ID": self.worker_id,
            "AUTONOMITE_CLIENT_ID": self.client_id,
            "AUTONOMITE_AGENT_NAME": self.agent_name,
            "AUTONOMITE_STATUS_PORT": str(self.status_port),
            "AUTONOMITE_CATALOG": json.dumps(self.catalog),
            "AUTONOMITE_USER_JOIN_TIMEOUT_S": str(self.user_join_timeout_s),
        }

    @classmethod
    def from_env(cls) -> "WorkerConfig":
        return cls(
            worker_id=os.environ["AUTONOMITE_WORKER_ID"],
            client_id=os.environ["AUTONOMITE_CLIENT_ID"],
            agent_name=os.environ["AUTONOMITE_AGENT_NAME"],
            status_port=int(os.environ["AUTONOMITE_STATUS_PORT"]),
            catalog=json.loads(os.environ.get("AUTONOMITE_CATALOG", "[]")),
            user_join_timeout_s=float(os.environ.get("AUTONOMITE_USER_JOIN_TIMEOUT_S", "120")),
        )


class WorkerState:
    """What the runtime reads from ``GET /status``: starting -> idle -> busy -> draining."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.state = "starting"
        self.accepted_job: str | None = None

    def as_json(self) -> dict:
        return {
            "worker_id": self.config.worker_id,
            "client_id": self.config.client_id,
            "agent_name": self.config.agent_name,
            "state": self.state,
            "registered": self.state != "starting",
            "job_id": self.accepted_job,
        }


async def _serve_status(state: WorkerState) -> web.AppRunner:
    async def status(_: web.Request) -> web.Response:
        return web.json_response(state.as_json())

    app = web.Application()
    app.router.add_get("/status", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", state.config.status_port).start()
    return runner


async def run_worker(config: WorkerConfig) -> int:
    from livekit.agents import AgentServer, JobContext, JobExecutorType, JobRequest

    from agent import providers
    from agent.rag import KnowledgeBase
    from agent.session import run_session

    state = WorkerState(config)
    # livekit-agents' job-runner warm-up loads local VAD and end-of-turn models (~250 MB)
    # into every worker. Only voice input uses them: a text-only catalog skips them.
    if not any(agent.get("stt") for agent in config.catalog):
        os.environ.setdefault("LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE", "0")
    # Everything a session needs is ready before the worker registers (and so reports idle):
    # the client's documents indexed, the configured provider plugins imported.
    providers.preload(config.catalog)
    knowledge_dir = os.environ.get("AUTONOMITE_KNOWLEDGE_DIR")
    knowledge = KnowledgeBase.from_dir(Path(knowledge_dir)) if knowledge_dir else None
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
    )

    async def on_request(req: JobRequest) -> None:
        # A second dispatch to this name (a crashed lease book, a retried request) must
        # never put a second end user into the same worker.
        if state.accepted_job is not None:
            logger.warning("rejecting job %s: this worker already served %s", req.id, state.accepted_job)
            await req.reject()
            return
        state.accepted_job = req.id
        state.state = "busy"
        await req.accept(identity=f"agent-{config.worker_id}")

    @server.rtc_session(agent_name=config.agent_name, on_request=on_request)
    async def entry(ctx: JobContext) -> None:
        async def on_shutdown(reason: str) -> None:
            # Shutdown callbacks run on the job's loop; the event belongs to ours.
            loop.call_soon_threadsafe(session_over.set)

        ctx.add_shutdown_callback(on_shutdown)
        await run_session(ctx, config.catalog, knowledge, config.user_join_timeout_s)

    server.on("worker_registered", lambda *_: _mark_idle(state))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)

    async def job_gone() -> None:
        """Backstop for a job that died without its shutdown callback (a crashed runner)."""
        while not (state.accepted_job and not server.active_jobs):
            await asyncio.sleep(1.0)
        await asyncio.sleep(5.0)  # an accepted job shows up in active_jobs within moments
        while server.active_jobs:
            await asyncio.sleep(1.0)
        logger.warning("job %s is no longer running; ending this worker", state.accepted_job)

    status_runner = await _serve_status(state)
    run_task = asyncio.create_task(server.run(devmode=False))
    waiters = [asyncio.create_task(e.wait()) for e in (session_over, stop_requested)]
    waiters.append(asyncio.create_task(job_gone()))
    done, _ = await asyncio.wait([run_task, *waiters], return_when=asyncio.FIRST_COMPLETED)

    exit_code = 0
    if run_task in done:
        exc = run_task.exception()
        logger.error("worker stopped unexpectedly: %s", exc)
        exit_code = 1
    else:
        state.state = "draining"
        if stop_requested.is_set():
            _exit_hard_after(DRAIN_TIMEOUT_S + 5)  # whoever stopped us may not be there to kill us
        try:
            await server.drain(timeout=DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("session did not end within %d s of the drain; closing anyway", DRAIN_TIMEOUT_S)
    await server.aclose()
    for t in waiters:
        t.cancel()
    await status_runner.cleanup()
    logger.info("worker %s exits with %d", config.worker_id, exit_code)
    return exit_code


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
    config = WorkerConfig.from_env()
    sys.exit(asyncio.run(run_worker(config)))
