"""An OTP-style supervisor for pykka actors, which have no supervision of their own.

Children are described by plain data (:class:`ChildSpec`): how to start one, whether to
restart it, how long to give it to stop. The strategy is one_for_one: a crashed child is
restarted alone. Every start is guarded: a start that raises is a failure like a crash,
counted toward the restart intensity and retried through a message to the supervisor
itself, never an exception that kills the supervisor. More than ``max_restarts``
restarts within ``within_s`` seconds means something is persistently wrong, so the
supervisor stops everything, last started first, and reports the failure upward: the
process exits non-zero instead of looping or hanging.

A child stopped gracefully (a removed client's pool drains: its sessions finish) stays
tracked until it has stopped, so it still shows in stats and in the ordered shutdown.
When the runtime shuts down, :class:`DrainChildren` drains every pool that way at once and
no pool starts again; a draining pool that crashes then is started again and drains what
it adopts, since its sessions must still finish. The runtime hears when the last is gone.

pykka tells an actor about an unhandled exception only for messages sent with ``tell``
(``ask`` returns it to the caller), so children subclass :class:`Supervised`, which turns
that hook, and a failing ``on_start``, into a :class:`ChildFailed` message.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka

from actors import _watch
from actors.messages import (
    ChildFailed,
    ChildStopped,
    Drain,
    DrainCause,
    DrainChildren,
    RestartChild,
    ShutdownAll,
    StartChild,
    StopChild,
)

logger = logging.getLogger("autonomite.supervisor")


class ChildGone(Exception):
    """Raised by a child spec's start when what the child was for is gone (a pool woken for
    a trigger just as a reload removed its client): not a crash, nothing to restart."""


class Restart(enum.Enum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after a crash
    TEMPORARY = "temporary"  # never restarted


@dataclass(frozen=True)
class ChildSpec:
    id: str
    start: Callable[..., pykka.ActorRef[Any]]  # called with supervisor= and child_id=
    restart: Restart = Restart.PERMANENT
    shutdown_timeout_s: float = 15.0


class Directory:
    """The current ref of every running child, by id: OTP's registered names.

    A restarted child has a new ref; actors that talk to it look it up here each time
    instead of holding a ref that may be dead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[str, pykka.ActorRef[Any]] = {}
        self._draining: dict[str, pykka.ActorRef[Any]] = {}

    def get(self, child_id: str, draining: bool = False) -> pykka.ActorRef[Any] | None:
        """The running child; with ``draining``, else the one on its way out (a removed
        client's pool still settles its leases)."""
        with self._lock:
            return self._refs.get(child_id) or (self._draining.get(child_id) if draining else None)

    def with_prefix(self, prefix: str, draining: bool = False) -> dict[str, pykka.ActorRef[Any]]:
        """Running children by id without the prefix; with ``draining``, also the children
        on their way out (a running child of the same id wins)."""
        with self._lock:
            found = {**self._draining, **self._refs} if draining else self._refs
            return {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}

    def record(self, child_id: str, ref: pykka.ActorRef[Any] | None) -> None:
        """Written by the supervisor alone (on its actor thread); read by anyone."""
        with self._lock:
            if ref is None:
                self._refs.pop(child_id, None)
            else:
                self._refs[child_id] = ref

    def record_draining(self, child_id: str, ref: pykka.ActorRef[Any] | None) -> None:
        with self._lock:
            if ref is None:
                self._draining.pop(child_id, None)
            else:
                self._draining[child_id] = ref


class Supervised(pykka.ThreadingActor):
    """Base class for supervised children: reports its own crash to the supervisor."""

    def __init__(self, supervisor: pykka.ActorRef[Any] | None = None, child_id: str = "") -> None:
        super().__init__()
        self.supervisor = supervisor
        self.child_id = child_id

    def on_start(self) -> None:
        try:
            self.setup()
        except Exception as e:
            self._report(e)
            raise

    def setup(self) -> None:
        """Override instead of ``on_start``: a failure here is reported like a crash."""

    def on_failure(
        self, exc_type: type[BaseException] | None, exc_value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._report(exc_value)

    def on_stop(self) -> None:
        """Stopped on purpose (drained, or shut down): the supervisor stops tracking it."""
        if self.supervisor is not None:
            try:
                self.supervisor.tell(ChildStopped(self.child_id, self.actor_ref))
            except pykka.ActorDeadError:
                pass

    def _report(self, error: BaseException | None) -> None:
        if self.supervisor is not None:
            try:
                self.supervisor.tell(ChildFailed(self.child_id, f"{type(error).__name__}: {error}", self.actor_ref))
            except pykka.ActorDeadError:
                pass


class Supervisor(pykka.ThreadingActor):
    def __init__(
        self,
        directory: Directory,
        max_restarts: int,
        within_s: float,
        on_give_up: Callable[[str], None],
        on_restart: Callable[[str], None] = lambda child_id: None,
    ) -> None:
        super().__init__()
        self.directory = directory
        self.max_restarts = max_restarts
        self.within_s = within_s
        self.on_give_up = on_give_up
        self.on_restart = on_restart
        self.specs: dict[str, ChildSpec] = {}  # insertion order is start order
        self.draining: dict[str, tuple[ChildSpec, pykka.ActorRef[Any]]] = {}
        self.restarts: tuple[float, ...] = ()  # when recent restarts happened (add_restart)
        self.gave_up = False
        self.closing: DrainChildren | None = None  # shutting down: these children drain, none starts
        self.told_drained = False
        self.shut = False  # ShutdownAll ran: nothing starts any more

    def on_receive(self, message: object) -> object:
        match message:
            case StartChild(spec, reply):
                ref = self._start_child(spec)
                if reply is not None:
                    reply(ref)
            case StopChild(child_id, graceful, why, ref, only_if, reply):
                stopping = self.directory.get(child_id)
                if (ref is None or stopping == ref) and (only_if is None or only_if()):
                    self._stop_child(child_id, graceful, why)
                else:
                    stopping = None
                if reply is not None:
                    reply(stopping is not None)
            case ChildFailed(child_id, error, ref):
                self._child_failed(child_id, error, ref)
            case RestartChild(child_id):
                self._restart(child_id)
            case ChildStopped(child_id, ref):
                self._child_stopped(child_id, ref)
            case DrainChildren():
                self._drain_children(message)
            case ShutdownAll():
                self._shutdown_all()
            case _:
                raise TypeError(f"supervisor: unexpected message {type(message).__name__}")
        return None

    def _start_child(self, spec: ChildSpec) -> pykka.ActorRef[Any] | None:
        """Start it, or leave it be if it runs already (two triggers may wake one pool).
        One that is failing and due a restart is started now; the restart then finds it."""
        if self._closed_to(spec.id) or self.gave_up or self.shut:
            logger.info("not starting %s: the runtime is shutting down", spec.id)
            return None
        running = self.directory.get(spec.id)
        if running is not None and running.is_alive():
            return running
        self.specs[spec.id] = spec
        self._start(spec)
        return self.directory.get(spec.id)

    def _closed_to(self, child_id: str) -> bool:
        return self.closing is not None and child_id.startswith(self.closing.prefix)

    def _start(self, spec: ChildSpec) -> None:
        """Guarded: a start that raises is reported like a crash, and so retried or given up;
        one that raises ChildGone is dropped (what it was for no longer exists)."""
        try:
            ref = spec.start(supervisor=self.actor_ref, child_id=spec.id)
        except ChildGone as e:
            logger.info("not starting %s: %s", spec.id, e)
            self.specs.pop(spec.id, None)
            self.directory.record(spec.id, None)
            return
        except Exception as e:  # noqa: BLE001 - whatever a child's start raises
            self.directory.record(spec.id, None)
            self.actor_ref.tell(ChildFailed(spec.id, f"start failed: {type(e).__name__}: {e}"))
            return
        self.directory.record(spec.id, ref)

    def _stop_child(self, child_id: str, graceful: bool, why: DrainCause = "removed") -> None:
        spec = self.specs.pop(child_id, None)
        ref = self.directory.get(child_id)
        self.directory.record(child_id, None)
        if spec is not None and ref is None and graceful and self.closing is not None:
            ref = self._start_once(spec)  # it was restarting: its successor drains what it adopts
        if spec is None or ref is None:
            return
        if graceful:
            self._drain(spec, ref, why)
        else:
            _stop(child_id, ref, spec.shutdown_timeout_s)

    def _drain(self, spec: ChildSpec, ref: pykka.ActorRef[Any], why: DrainCause = "removed") -> None:
        self.draining[spec.id] = (spec, ref)
        self.directory.record_draining(spec.id, ref)
        # The child stops itself once its work is done.
        _watch.tell(ref, Drain("shutdown" if self.closing is not None else why))

    def _drain_children(self, message: DrainChildren) -> None:
        self.closing = message
        for child_id in [c for c in self.specs if c.startswith(message.prefix)]:
            self._stop_child(child_id, graceful=True)
        self._check_drained()

    def _check_drained(self) -> None:
        """Shutting down and the last draining child is gone: tell the runtime, once."""
        if self.closing is None or self.told_drained or self.draining or any(map(self._closed_to, self.specs)):
            return
        self.told_drained = True
        try:
            self.closing.on_drained()
        except Exception:  # the runtime's hook must never take the supervisor down
            logger.exception("the drained hook failed")

    def _start_once(self, spec: ChildSpec) -> pykka.ActorRef[Any] | None:
        try:
            return spec.start(supervisor=self.actor_ref, child_id=spec.id)
        except Exception as e:  # noqa: BLE001 - whatever a child's start raises
            logger.error("child %s could not start again to drain (%s: %s); its workers are left to the sweep",
                         spec.id, type(e).__name__, e)
            return None

    def _child_stopped(self, child_id: str, ref: pykka.ActorRef[Any]) -> None:
        entry = self.draining.get(child_id)
        if entry is not None and entry[1] == ref:
            del self.draining[child_id]
            self.directory.record_draining(child_id, None)
            logger.info("child %s drained and stopped", child_id)
            self._check_drained()

    def _child_failed(self, child_id: str, error: str, ref: pykka.ActorRef[Any] | None = None) -> None:
        if ref is not None and self.draining.get(child_id, (None, None))[1] == ref:
            return self._draining_child_failed(child_id, error, ref)
        if ref is not None and self.directory.get(child_id) not in (None, ref):
            return  # an older incarnation (the client was removed and added again meanwhile)
        spec = self.specs.get(child_id)
        if spec is None or self.gave_up:
            return  # removed on purpose, or we are already going down
        if spec.restart is Restart.TEMPORARY:
            logger.warning("child %s crashed (%s); temporary, not restarted", child_id, error)
            del self.specs[child_id]
            self.directory.record(child_id, None)
            return
        if self._intensity_exceeded(child_id, error):
            return
        logger.warning("child %s crashed (%s); restarting", child_id, error)
        self.directory.record(child_id, None)
        self.actor_ref.tell(RestartChild(child_id))

    def _draining_child_failed(self, child_id: str, error: str, ref: pykka.ActorRef[Any]) -> None:
        if self.closing is None:
            logger.error("draining child %s crashed (%s); its workers are left to the sweep at shutdown", child_id, error)
        elif not self._intensity_exceeded(child_id, error):
            # Shutting down: its sessions must still finish, so a new incarnation adopts them and drains.
            logger.warning("draining child %s crashed (%s); starting it again to finish draining", child_id, error)
            spec = self.draining[child_id][0]
            new = self._start_once(spec)
            if new is not None:
                self.on_restart(child_id)
                return self._drain(spec, new)
        self._child_stopped(child_id, ref)

    def _intensity_exceeded(self, child_id: str, error: str) -> bool:
        """Count a restart; past the intensity, stop everything and report upward."""
        self.restarts, allowed = add_restart(self.restarts, time.monotonic(), self.max_restarts, self.within_s)
        if allowed:
            return False
        self.gave_up = True
        reason = (
            f"supervisor: restart intensity exceeded ({len(self.restarts)} restarts within "
            f"{self.within_s:g} s, limit {self.max_restarts}); last crash: child {child_id}: {error}"
        )
        logger.critical(reason)
        self._shutdown_all()
        self.on_give_up(reason)
        return True

    def _restart(self, child_id: str) -> None:
        spec = self.specs.get(child_id)
        if spec is None or self.gave_up:
            return
        running = self.directory.get(child_id)
        if running is not None and running.is_alive():
            self.on_restart(child_id)  # restarted all the same: a StartChild got to it first
            return
        self._start(spec)  # first, so that whoever sees the restart counted finds the new child
        self.on_restart(child_id)

    def _shutdown_all(self) -> None:
        self.shut = True
        children = [(cid, self.specs.pop(cid), self.directory.get(cid)) for cid in reversed(list(self.specs))]
        children += [(cid, spec, ref) for cid, (spec, ref) in self.draining.items()]
        self.draining.clear()
        for child_id, spec, ref in children:
            self.directory.record(child_id, None)
            self.directory.record_draining(child_id, None)
            if ref is not None:
                _stop(child_id, ref, spec.shutdown_timeout_s)


def add_restart(restarts: tuple[float, ...], now: float, max_restarts: int,
                within_s: float) -> tuple[tuple[float, ...], bool]:
    """OTP's restart intensity, pure: count a restart at ``now`` among those of the last
    ``within_s`` seconds; allowed while at most ``max_restarts``. Returns the restarts to
    keep and whether this one may happen. A child that crashes now and then is restarted
    for ever; one that crashes in a loop stops the tree, and the operator learns why."""
    recent = tuple(t for t in restarts if now - t <= within_s) + (now,)
    return recent, len(recent) <= max_restarts


def _stop(child_id: str, ref: pykka.ActorRef[Any], timeout_s: float) -> None:
    try:
        if not ref.stop(block=True, timeout=timeout_s):
            logger.info("child %s was already stopped", child_id)
    except pykka.Timeout:
        logger.error("child %s did not stop within %g s", child_id, timeout_s)
