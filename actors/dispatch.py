"""DispatchActor: a trigger becomes a lease plus a LiveKit dispatch to the leased worker.

No idle worker means an immediate 503 with Retry-After (the pool counts the miss, the
scaler reads it): nothing queues without bound. The LiveKit call runs on the adapter's
loop; its result comes back here as DispatchFinished, so the mailbox never waits on the
network. A failed dispatch returns the lease: nothing leaks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone

import pykka

from actors.messages import (
    DispatchFinished,
    Lease,
    Leased,
    ReturnLease,
    SessionEnded,
    Trigger,
    TriggerRequest,
    TriggerResult,
)
from actors.supervisor import Directory, Supervised
from runtime.livekit import LiveKitClient, participant_token
from runtime.metrics import Metrics
from runtime.settings import AgentSettings, ClientSettings, LiveKitSettings

logger = logging.getLogger("autonomite.dispatch")

POOL_ASK_TIMEOUT_S = 2.0
RETRY_AFTER_S = 1


def pool_id(client_id: str) -> str:
    return f"pool:{client_id}"


def build_metadata(
    client: ClientSettings, agent: AgentSettings, request: TriggerRequest, now: datetime | None = None
) -> dict:
    """What primes the agent's LLM for this session (read by ``agent/`` from the job)."""
    now = now or datetime.now(timezone.utc)
    return {
        "client_id": client.id,
        "client_name": client.name,
        "agent_name": agent.name,
        "user_email": request.user_email,
        "user_context": request.context or {},
        "system_prompt": agent.system_prompt[:200],
        "enable_rag": agent.enable_rag,
        "voice_id": agent.voice_id,
        "conversation_id": request.conversation_id,
        "session_started_at": now.isoformat(),
        "is_preview": request.room_name.startswith("preview_"),
        "has_conversation_history": request.conversation_id is not None,
    }


class DispatchActor(Supervised):
    def __init__(
        self,
        directory: Directory,
        livekit: LiveKitClient,
        metrics: Metrics,
        supervisor=None,  # noqa: ANN001
        child_id: str = "",
    ) -> None:
        super().__init__(supervisor, child_id)
        self.directory = directory
        self.livekit = livekit
        self.metrics = metrics
        # Live sessions by (client, worker): what to clean up if the worker dies mid-session.
        self.sessions: dict[tuple[str, str], tuple[LiveKitSettings, str, str]] = {}

    def on_receive(self, message: object) -> object:
        match message:
            case Trigger():
                return self._trigger(message)
            case DispatchFinished():
                return self._finished(message)
            case SessionEnded(client_id, worker_id, failed):
                return self._session_ended(client_id, worker_id, failed)
        raise TypeError(f"dispatch: unexpected message {type(message).__name__}")

    def _trigger(self, trigger: Trigger) -> None:
        started_at = time.perf_counter()
        request, client = trigger.request, trigger.client
        agent = client.agent(request.agent)
        pool = self.directory.get(pool_id(client.id))
        if agent is None or pool is None:
            return self._reply(trigger, TriggerResult(404, {"error": "not_found", "detail": "unknown client or agent"}))
        try:
            lease = pool.ask(Lease(request.room_name), timeout=POOL_ASK_TIMEOUT_S)
        except (pykka.ActorDeadError, pykka.Timeout):
            lease = None  # the pool is restarting: as good as no idle worker
        if not isinstance(lease, Leased):
            return self._reply(
                trigger,
                TriggerResult(503, {"error": "no_idle_worker", "detail": "all warm workers are busy"}, RETRY_AFTER_S),
                outcome="no_idle_worker",
            )
        metadata = json.dumps(build_metadata(client, agent, request))
        future = self.livekit.create_dispatch(client.livekit, lease.agent_name, request.room_name, metadata)
        me = self.actor_ref

        def done(f) -> None:  # noqa: ANN001 - runs on the LiveKit adapter's thread
            error = None if f.exception() is None else _describe(f.exception())
            try:
                me.tell(DispatchFinished(trigger, lease, started_at, None if error else f.result(), error))
            except pykka.ActorDeadError:
                pool.tell(ReturnLease(lease.worker_id))

        future.add_done_callback(done)

    def _finished(self, message: DispatchFinished) -> None:
        trigger, lease = message.trigger, message.lease
        client = trigger.client
        if message.error is not None:
            logger.error("dispatch to %s failed: %s; lease returned", lease.agent_name, message.error)
            pool = self.directory.get(pool_id(client.id))
            if pool is not None:
                pool.tell(ReturnLease(lease.worker_id))
            body = {"error": "livekit_error", "detail": message.error}
            return self._reply(trigger, TriggerResult(502, body), outcome="livekit_error")
        self.metrics.dispatch_latency.labels(client.id).observe(time.perf_counter() - message.started_at)
        room = trigger.request.room_name
        self.sessions[(client.id, lease.worker_id)] = (client.livekit, message.dispatch_id, room)
        identity = _user_identity(trigger.request.user_email)
        logger.info("dispatched %s to room %s (%s)", lease.agent_name, room, message.dispatch_id)
        body = {
            "dispatch_id": message.dispatch_id,
            "room_name": room,
            "worker_id": lease.worker_id,
            "agent_name": lease.agent_name,
            "livekit_url": client.livekit.url,
            "participant_identity": identity,
            "participant_token": participant_token(client.livekit, room, identity),
        }
        self._reply(trigger, TriggerResult(200, body), outcome="dispatched")

    def _session_ended(self, client_id: str, worker_id: str, failed: bool) -> None:
        session = self.sessions.pop((client_id, worker_id), None)
        if session is None or not failed:
            return
        lk, dispatch_id, room = session
        logger.warning("worker %s died mid-session; deleting its dispatch %s in room %s", worker_id, dispatch_id, room)
        future = self.livekit.delete_dispatch(lk, dispatch_id, room)
        future.add_done_callback(
            lambda f: f.exception() and logger.error("deleting dispatch %s: %s", dispatch_id, _describe(f.exception()))
        )

    def _reply(self, trigger: Trigger, result: TriggerResult, outcome: str | None = None) -> None:
        self.metrics.triggers.labels(trigger.client.id, outcome or f"http_{result.status}").inc()
        trigger.reply(result)


def _user_identity(email: str | None) -> str:
    # The email is personal data; the identity LiveKit sees and logs is a hash of it.
    seed = email.lower() if email else f"{time.time_ns()}"
    return "user-" + hashlib.sha256(seed.encode()).hexdigest()[:12]


def _describe(error: BaseException) -> str:
    """A short error text for logs and the 502 body: type and message, no request data."""
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
