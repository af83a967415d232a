"""ScalerActor: every tick, read each pool's stats and send Resize where the policy says so.

The policy (:func:`next_target`) is a pure function, so it is tested without threads:

- grow by ``step`` (plus the demand missed since the last tick) when utilization is above
  ``high_water`` or any trigger was refused, never past ``max_size``;
- shrink to ``leased + min_idle`` only after utilization stayed below ``low_water`` for
  ``scale_down_after_s`` (a stabilization window, as Kubernetes' HPA does), and only idle
  workers go: the pool never stops a leased one on a resize.

The idle floor (``min_idle``) is the pool's own invariant, kept at once on every lease.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import pykka

from actors import _watch, timers
from actors.dispatch import pool_id
from actors.messages import GetStats, PoolStats, PoolStatsReport, Resize, ScaleTick
from actors.supervisor import Directory, Supervised
from runtime.metrics import Metrics
from runtime.settings import ScalerSettings

logger = logging.getLogger("autonomite.scaler")


@dataclass(frozen=True)
class Decision:
    target: int | None  # None: leave the pool alone
    low_since: float | None  # when utilization first dropped below low_water, if it still is


def next_target(stats: PoolStats, policy: ScalerSettings, missed: int, low_since: float | None, now: float) -> Decision:
    if missed > 0 or (stats.total > 0 and stats.utilization > policy.high_water):
        grown = min(stats.max_size, max(stats.target, stats.total) + policy.step + missed)
        return Decision(grown if grown > stats.target else None, None)
    if stats.utilization < policy.low_water:
        low_since = now if low_since is None else low_since
        floor = stats.leased + stats.min_idle
        if now - low_since >= policy.scale_down_after_s and stats.target > floor:
            return Decision(floor, None)
        return Decision(None, low_since)
    return Decision(None, None)


class ScalerActor(Supervised):
    def __init__(
        self,
        directory: Directory,
        policy: ScalerSettings,
        metrics: Metrics,
        supervisor: pykka.ActorRef[Any] | None = None,
        child_id: str = "",
    ) -> None:
        super().__init__(supervisor, child_id)
        self.directory = directory
        self.policy = policy
        self.metrics = metrics
        self.missed_seen: dict[str, int] = {}
        self.low_since: dict[str, float | None] = {}
        self.timer: timers.Timer | None = None

    def setup(self) -> None:
        self.timer = timers.after(self.policy.interval_s, self.actor_ref, ScaleTick())

    def on_receive(self, message: object) -> object:
        match message:
            case ScaleTick():
                self._tick()
                self.timer = timers.after(self.policy.interval_s, self.actor_ref, ScaleTick())
                return None
            case PoolStatsReport(client_id, stats):
                self._decide(client_id, stats)
            case _:
                raise TypeError(f"scaler: unexpected message {type(message).__name__}")
        return None

    def _tick(self) -> None:
        """Ask every pool for its stats; each answer comes back as its own message (a slow
        or restarting pool only misses this tick, it never holds up the others)."""
        pools = self.directory.with_prefix(pool_id(""))
        me = self.actor_ref
        for cid, ref in pools.items():
            _watch.tell(ref, GetStats(reply=functools.partial(_report, me, cid)))
        for gone in set(self.missed_seen) - set(pools):
            self.missed_seen.pop(gone, None)
            self.low_since.pop(gone, None)

    def _decide(self, cid: str, stats: PoolStats) -> None:
        missed = stats.missed_total - self.missed_seen.get(cid, stats.missed_total)
        self.missed_seen[cid] = stats.missed_total
        decision = next_target(stats, self.policy, max(0, missed), self.low_since.get(cid), time.monotonic())
        self.low_since[cid] = decision.low_since
        if decision.target is None:
            return
        direction: Literal["up", "down"] = "up" if decision.target > stats.target else "down"
        logger.info("scaler: %s target %d -> %d (%s)", cid, stats.target, decision.target, direction)
        self.metrics.scale_events.labels(cid, direction).inc()
        pool = self.directory.get(pool_id(cid))
        if pool is not None:
            _watch.tell(pool, Resize(decision.target, direction))

    def on_stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _report(scaler: pykka.ActorRef[Any], client_id: str, stats: PoolStats) -> None:
    """A pool's stats answer, back to the scaler as a message of its own (the pool's thread)."""
    _watch.tell(scaler, PoolStatsReport(client_id, stats))
