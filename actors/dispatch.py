"""DispatchActor: a trigger becomes a lease, a claim, a LiveKit dispatch and an accepted job.

The lease protocol with the pools is asynchronous (messages both ways: see
``actors/messages.py``), so one stuck pool never stalls another client's triggers. After
a lease, ``runtime.livekit.handoff`` claims the worker, dispatches and waits for the worker to
accept the job, on the LiveKit adapter's loop; the outcome comes back here as a message.

A 200 means the leased worker accepted the job. A handoff that fails (the worker lost
LiveKit, was claimed already, or did not accept in time) is tried once more on another
idle worker, then refused with 503 and Retry-After: a second worker usually succeeds
where the first failed (each failure is that worker's), and more tries would keep the
caller waiting. With no idle worker, the trigger waits in its pool's queue for a worker
being started, up to ``max_wait_s`` in all, and only while the pool is below
``max_size`` (the pool counts the miss, the scaler reads it); then it is a 503: nothing
queues without bound. A LiveKit error is a 502 (another worker
would meet the same server); the lease goes back.

State owned by this actor's thread: the triggers in flight and the live sessions.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import pykka

from actors import _watch, timers
from actors.dispatch_policy import LeaseVerdict, after_handoff, lease_verdict, may_stop_idle_pool
from actors.messages import (
    HandoffDone,
    Lease,
    Leased,
    LeaseFailed,
    LeaseTimeout,
    NoIdleWorker,
    PoolIdle,
    PoolRested,
    PoolStarted,
    ReturnLease,
    RoomEvent,
    SessionEnded,
    Trigger,
    TriggerRequest,
    TriggerResult,
)
from actors.supervisor import Directory, Supervised
from agent.contract import StatusAddress
from runtime.errors import describe
from runtime.livekit.client import LiveKitClient, participant_token
from runtime.livekit.handoff import Handoff, WorkerControl, hand_off
from runtime.metrics import Metrics
from runtime.sessions.log import SessionLog, user_hash
from runtime.settings import AgentSettings, ClientSettings, DispatchSettings, LiveKitSettings

logger = logging.getLogger("autonomite.dispatch")

POOL_ANSWER_TIMEOUT_S = 2.0  # a pool answers a Lease in microseconds unless it is restarting
RETRY_AFTER_S = 1


def pool_id(client_id: str) -> str:
    return f"pool:{client_id}"


def build_metadata(
    client: ClientSettings, agent: AgentSettings, request: TriggerRequest, now: datetime | None = None,
    lease_id: str | None = None,
) -> dict[str, Any]:
    """What primes the agent's LLM for this session (read by ``agent/`` from the job)."""
    now = now or datetime.now(UTC)
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
        "lease_id": lease_id,  # the worker accepts only the job of its current lease
    }


@dataclass(frozen=True)
class _InFlight:
    trigger: Trigger
    attempt: int
    started_at: float
    leased: bool = False  # a lease came back: the handoff is under way


@dataclass(frozen=True)
class _Session:
    project: LiveKitSettings  # where the worker registered: its dispatch lives there
    dispatch_id: str
    room: str
    worker: StatusAddress  # the worker's status port: where "the room ended" is told


class DispatchActor(Supervised):
    def __init__(
        self,
        directory: Directory,
        livekit: LiveKitClient,
        metrics: Metrics,
        settings: DispatchSettings = DispatchSettings(),  # noqa: B008 - an immutable model
        wake_pool: Callable[[str, Callable[[bool], None]], None] = lambda client_id, done: done(False),
        rest_pool: Callable[[str, pykka.ActorRef[Any], Callable[[bool], None]], None] = lambda cid, pool, done: None,
        sessions: SessionLog | None = None,
        supervisor: pykka.ActorRef[Any] | None = None,
        child_id: str = "",
    ) -> None:
        super().__init__(supervisor, child_id)
        self.directory = directory
        self.records = sessions  # every trigger's record (only told: a queue, never waited on)
        # A client at zero has no pool until a trigger needs one: wake_pool(client, done)
        # asks the supervisor to start it (done(ok) comes back on its thread); rest_pool
        # has a pool at rest stopped. Both only tell the supervisor: they never block.
        self.wake_pool, self.rest_pool = wake_pool, rest_pool
        self.waking: dict[str, list[int]] = {}  # client -> triggers waiting for its pool to start
        # Clients whose pool this dispatcher asked to stop at rest: no lease goes to it (their
        # next trigger wakes a new one), and its PoolIdle is not taken twice.
        self.resting: dict[str, pykka.ActorRef[Any]] = {}
        self.livekit = livekit
        self.metrics = metrics
        self.settings = settings
        self.control = WorkerControl()
        self.ids = itertools.count(1)
        self.in_flight: dict[int, _InFlight] = {}
        # Live sessions by (client, worker): what to clean up if the worker dies mid-session,
        # and by (client, room): which worker to tell when LiveKit says the room ended.
        self.sessions: dict[tuple[str, str], _Session] = {}
        self.rooms: dict[tuple[str, str], str] = {}

    def on_receive(self, message: object) -> object:
        match message:
            case Trigger():
                trigger_id = next(self.ids)
                self.in_flight[trigger_id] = _InFlight(message, 1, time.perf_counter())
                if self.records is not None:
                    r = message.request
                    self.records.received(message.session_id, r.client_id, r.agent, r.room_name,
                                           user_hash(r.user_email), message.received_at or time.time())
                self._ask_pool(trigger_id)
            case Leased():
                self._leased(message)
            case NoIdleWorker(trigger_id, _):
                self._refuse(trigger_id, "no_idle_worker", "all warm workers are busy and the pool is at max_size, "
                             "or none became ready within max_wait_s")
            case LeaseTimeout(trigger_id, attempt):
                flight = self.in_flight.get(trigger_id)
                if flight and flight.attempt == attempt and not flight.leased:
                    self._refuse(trigger_id, "no_idle_worker", "the pool did not answer in time")
            case HandoffDone():
                self._handed_off(message)
            case SessionEnded(client_id, worker_id, failed):
                self._session_ended(client_id, worker_id, failed)
            case RoomEvent(client_id, room, event):
                self._room_event(client_id, room, event)
            case PoolStarted(client_id, ok):
                self._pool_started(client_id, ok)
            case PoolIdle(client_id, pool):
                self._pool_idle(client_id, pool)
            case PoolRested(client_id, pool, stopped):
                if not stopped and self.resting.get(client_id) == pool:
                    del self.resting[client_id]  # kept: it may be leased again, and rest later
            case _:
                raise TypeError(f"dispatch: unexpected message {type(message).__name__}")
        return None

    def _ask_pool(self, trigger_id: int, may_wake: bool = True) -> None:
        flight = self.in_flight[trigger_id]
        client_id = flight.trigger.client.id
        pool = None if client_id in self.resting else self.directory.get(pool_id(client_id))
        # What is left of the wait budget: a retry after a failed handoff may wait too. The
        # timeout is the same whether the pool runs or is woken first: both count from the trigger.
        wait_s = max(0.0, self.settings.max_wait_s - (time.perf_counter() - flight.started_at))
        timeout = LeaseTimeout(trigger_id, flight.attempt)
        if pool is None and may_wake:
            self._wake(client_id, trigger_id)
            timers.after(POOL_ANSWER_TIMEOUT_S + wait_s, self.actor_ref, timeout)
            return
        lease = Lease(trigger_id, flight.trigger.request.room_name, self.actor_ref, wait_s=round(wait_s, 3))
        if pool is None or not _watch.tell(pool, lease):
            self._refuse(trigger_id, "no_idle_worker", "the pool is restarting")
            return
        timers.after(POOL_ANSWER_TIMEOUT_S + wait_s, self.actor_ref, timeout)

    def _wake(self, client_id: str, trigger_id: int) -> None:
        """No pool (a client at zero, or one restarting): have it started; the trigger waits.
        One wake per client at a time; triggers that timed out meanwhile do not count (a
        wake the supervisor never answered must not hold the client's later triggers)."""
        waiting = [t for t in self.waking.get(client_id, []) if t in self.in_flight and t != trigger_id]
        self.waking[client_id] = [*waiting, trigger_id]
        if not waiting:
            self.wake_pool(client_id, functools.partial(_pool_started, self.actor_ref, client_id))

    def _pool_started(self, client_id: str, ok: bool) -> None:
        self.resting.pop(client_id, None)
        for trigger_id in self.waking.pop(client_id, []):
            if trigger_id not in self.in_flight:
                continue  # answered meanwhile (the dispatcher's deadline)
            if ok:
                self._ask_pool(trigger_id, may_wake=False)
            else:
                self._refuse(trigger_id, "no_idle_worker", "the client's pool could not start")

    def _pool_idle(self, client_id: str, pool: pykka.ActorRef[Any]) -> None:
        in_flight = sum(1 for f in self.in_flight.values() if f.trigger.client.id == client_id)
        if may_stop_idle_pool(same_pool=self.directory.get(pool_id(client_id)) == pool,
                              waking=client_id in self.waking, resting=self.resting.get(client_id) == pool,
                              triggers_in_flight=in_flight):
            logger.info("pool %s at rest: stopping it until its next trigger", client_id)
            self.resting[client_id] = pool
            self.rest_pool(client_id, pool, functools.partial(_pool_rested, self.actor_ref, client_id, pool))

    def _leased(self, lease: Leased) -> None:
        flight = self.in_flight.get(lease.trigger_id)
        if flight is None or flight.leased:  # answered already (the pool was late): give it back
            self._tell_pool(lease.client_id, ReturnLease(lease.worker_id, lease.lease_id))
            return
        self.in_flight[lease.trigger_id] = replace(flight, leased=True)
        if self.records is not None:
            self.records.leased(flight.trigger.session_id, lease.client_id, lease.worker_id, lease.project.url)
        request, client = flight.trigger.request, flight.trigger.client
        agent = client.agent(request.agent)
        assert agent is not None  # the gateway found it in this same snapshot of the client
        metadata = json.dumps(build_metadata(client, agent, request, lease_id=lease.lease_id))
        future = self.livekit.submit(
            hand_off(
                self.livekit, self.control, lease.project, worker=lease.status, lease_id=lease.lease_id,
                worker_id=lease.worker_id,
                agent_name=lease.agent_name, room=request.room_name, metadata=metadata,
                accept_timeout_s=self.settings.accept_timeout_s,
            )
        )
        me = self.actor_ref

        def done(f: Future[Handoff]) -> None:  # runs on the LiveKit adapter's thread
            error = f.exception()
            handoff = f.result() if error is None else Handoff("livekit_error", error=describe(error))
            if not _watch.tell(me, HandoffDone(lease.trigger_id, lease, handoff)):  # this dispatcher died
                self._tell_pool(lease.client_id, _to_pool(lease, lease_verdict(handoff.outcome, handoff.released)))

        future.add_done_callback(done)

    def _handed_off(self, message: HandoffDone) -> None:
        lease, handoff = message.lease, message.handoff
        flight = self.in_flight.get(message.trigger_id)
        attempt = flight.attempt if flight else self.settings.attempts
        decision = after_handoff(handoff.outcome, handoff.released, attempt, self.settings.attempts)
        if decision.lease is not None:
            self._tell_pool(lease.client_id, _to_pool(lease, decision.lease))
        match decision.trigger:
            case "livekit_error":
                logger.error("dispatch to %s failed: %s", lease.agent_name, handoff.error)
                body = {"error": "livekit_error", "detail": handoff.error}
                self._answer(message.trigger_id, TriggerResult(502, body), "livekit_error")
                return None
            case "retry" | "handoff_failed":
                logger.warning("handoff to %s failed (%s), attempt %d", lease.agent_name, handoff.outcome, attempt)
                self.metrics.handoff_failures.labels(lease.client_id, handoff.outcome).inc()
                if flight is None:
                    return None
                if decision.trigger == "retry":
                    if self.records is not None:  # that worker's exit is no longer this session's end
                        self.records.released(flight.trigger.session_id, lease.client_id, lease.worker_id)
                    self.in_flight[message.trigger_id] = replace(flight, attempt=attempt + 1, leased=False)
                    self._ask_pool(message.trigger_id)
                    return None
                self._refuse(message.trigger_id, "handoff_failed", "no warm worker took the session in time")
                return None
        if flight is None:  # cannot happen: a trigger is answered only once its handoff is over
            return None
        assert handoff.dispatch_id is not None  # "accepted": LiveKit created the dispatch
        trigger, client = flight.trigger, lease.client_id
        room, project = trigger.request.room_name, lease.project  # where the worker is registered
        self.sessions[(client, lease.worker_id)] = _Session(project, handoff.dispatch_id, room, lease.status)
        self.rooms[(client, room)] = lease.worker_id
        self.metrics.dispatch_latency.labels(client).observe(time.perf_counter() - flight.started_at)
        identity = _user_identity(trigger.request.user_email)
        logger.info("dispatched %s to room %s (%s), accepted", lease.agent_name, room, handoff.dispatch_id)
        body = {
            "session_id": trigger.session_id,
            "dispatch_id": handoff.dispatch_id,
            "room_name": room,
            "worker_id": lease.worker_id,
            "agent_name": lease.agent_name,
            "livekit_url": project.url,
            "participant_identity": identity,
            "participant_token": participant_token(project, room, identity),
        }
        self._answer(message.trigger_id, TriggerResult(200, body), "dispatched")

    def _session_ended(self, client_id: str, worker_id: str, failed: bool) -> None:
        session = self.sessions.pop((client_id, worker_id), None)
        if session is None:
            return
        if self.rooms.get((client_id, session.room)) == worker_id:
            del self.rooms[(client_id, session.room)]
        if not failed:
            return
        logger.warning("worker %s died mid-session; deleting its dispatch %s in room %s", worker_id,
                       session.dispatch_id, session.room)
        future = self.livekit.submit(self.livekit.delete_dispatch(session.project, session.dispatch_id, session.room))
        future.add_done_callback(functools.partial(_log_failure, f"deleting dispatch {session.dispatch_id}"))

    def _room_event(self, client_id: str, room: str, event: str) -> None:
        """LiveKit says the room ended, or a user left it: the worker ends its session
        (for a user leaving, only if no other user is still there: the worker decides)."""
        worker_id = self.rooms.get((client_id, room))
        session = self.sessions.get((client_id, worker_id)) if worker_id else None
        if session is None:
            return
        logger.info("%s in room %s: telling worker %s", event, room, worker_id)
        if_no_users = "1" if event == "participant_left" else "0"
        self.livekit.submit(self.control.call("POST", session.worker, "/end", reason=event, if_no_users=if_no_users))

    def _refuse(self, trigger_id: int, code: str, detail: str) -> None:
        result = TriggerResult(503, {"error": "no_idle_worker", "detail": detail}, RETRY_AFTER_S)
        self._answer(trigger_id, result, code)

    def _answer(self, trigger_id: int, result: TriggerResult, outcome: str) -> None:
        flight = self.in_flight.pop(trigger_id, None)
        if flight is None:
            return
        self.metrics.triggers.labels(flight.trigger.client.id, outcome).inc()
        flight.trigger.reply(result)
        if self.records is not None:
            error = None if result.status == 200 else str(result.body.get("error"))
            self.records.answered(flight.trigger.session_id, flight.trigger.client.id, result.status, error)

    def _tell_pool(self, client_id: str, message: object) -> None:
        pool = self.directory.get(pool_id(client_id), draining=True)
        if pool is not None:
            _watch.tell(pool, message)

    def on_stop(self) -> None:
        self.livekit.submit(self.control.close())
        super().on_stop()

    def on_failure(
        self, exc_type: type[BaseException] | None, exc_value: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Crashed: no trigger in flight is left to the gateway's deadline."""
        for trigger_id in list(self.in_flight):
            self._refuse(trigger_id, "no_idle_worker", "the dispatcher is restarting")
        self.livekit.submit(self.control.close())
        super().on_failure(exc_type, exc_value, tb)


def _to_pool(lease: Leased, verdict: LeaseVerdict) -> ReturnLease | LeaseFailed:
    if verdict == "return":
        return ReturnLease(lease.worker_id, lease.lease_id)
    return LeaseFailed(lease.worker_id, lease.lease_id, verdict)


def _user_identity(email: str | None) -> str:
    # The email is personal data; the identity LiveKit sees and logs is a hash of it.
    return user_hash(email) or "user-" + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:12]


def _log_failure(what: str, future: Future[Any]) -> None:
    """A best-effort call's end: logged if it failed, nothing else (runs on the adapter's thread)."""
    if (error := future.exception()) is not None:
        logger.error("%s: %s", what, describe(error))


def _pool_started(dispatcher: pykka.ActorRef[Any], client_id: str, ok: bool) -> None:
    """The supervisor's answer to a wake, back to the dispatcher as a message (its thread)."""
    _watch.tell(dispatcher, PoolStarted(client_id, ok))


def _pool_rested(dispatcher: pykka.ActorRef[Any], client_id: str, pool: pykka.ActorRef[Any], stopped: bool) -> None:
    _watch.tell(dispatcher, PoolRested(client_id, pool, stopped))
