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
import time
from pathlib import Path
from typing import Any

from agent.contract import Env, WorkerConfig
from agent.lease_book import CLAIM_TIMEOUT_S, LeaseBook
from agent.lifeline import outlive_runtime, watch_lifeline
from agent.status_server import serve_status

logger = logging.getLogger("autonomite.agent")

DRAIN_TIMEOUT_S = 8  # a stopped worker lets its session wrap up this long, then goes


async def run_worker(config: WorkerConfig) -> int:
    from livekit.agents import AgentServer, JobContext, JobExecutorType, JobRequest

    from agent import providers
    from agent.last_words import say_then_end
    from agent.rag import KnowledgeBase
    from agent.session import Milestone, end_cause, end_session, run_session

    state = LeaseBook(config)
    # livekit-agents' job-runner warm-up loads local VAD and end-of-turn models (~250 MB)
    # into every worker. Only cloud speech input uses them (its turns end by that model):
    # text-only and offline voice catalogs skip them (offline turns end on silero's VAD).
    if not any(agent.stt is not None and not agent.offline_speech for agent in config.catalog):
        os.environ.setdefault("LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE", "0")
    # Everything a session needs is ready before the worker registers (and so reports idle):
    # the client's documents indexed, the configured provider plugins imported.
    knowledge_dir, knowledge_fd = os.environ.get(Env.KNOWLEDGE_DIR), os.environ.get(Env.KNOWLEDGE_FD)
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
            # Shutdown callbacks run on the job's loop; the lease book and the event are ours.
            loop.call_soon_threadsafe(state.ended, end_cause(reason))
            loop.call_soon_threadsafe(session_over.set)

        def milestone(what: Milestone) -> None:  # from the job's loop, like on_shutdown
            loop.call_soon_threadsafe(state.joined if what == "in_room" else state.user_came)

        ctx.add_shutdown_callback(on_shutdown)
        # The job runs on a loop of its own (thread executor); /end reaches it through here.
        job_loop, entry_task = asyncio.get_running_loop(), asyncio.current_task()
        def end_from_any_thread(reason: str, if_no_users: bool, say: bool = False) -> None:
            if say:  # the runtime ends its sessions: it is shutting down, or the pool draining
                state.ended("drained")  # (called on our loop, by the status port)
                job_loop.call_soon_threadsafe(say_then_end, ctx, entry_task, reason)
            else:
                job_loop.call_soon_threadsafe(end_session, ctx, entry_task, reason, if_no_users)

        state.end_session = end_from_any_thread
        await run_session(ctx, config.catalog, knowledge, config.user_join_timeout_s, config.rejoin_grace_s,
                          milestone)

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
    status_runner = await serve_status(state)
    run_task: asyncio.Task[Any] = asyncio.create_task(server.run(devmode=False))
    waiters: list[asyncio.Task[Any]] = [asyncio.create_task(e.wait()) for e in (session_over, stop_requested)]
    waiters += [asyncio.create_task(job_gone()), asyncio.create_task(outlive_runtime(state, runtime_gone))]
    done, _ = await asyncio.wait([run_task, *waiters], return_when=asyncio.FIRST_COMPLETED)

    exit_code = 0
    if run_task in done:
        exc = run_task.exception()
        logger.error("worker stopped unexpectedly: %s", exc)
        exit_code = 1
    else:
        if stop_requested.is_set() and state.accepted_job:
            state.ended("drained")  # stopped mid-session (no cause yet: its session was not over)
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


def _mark_idle(state: LeaseBook) -> None:
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
