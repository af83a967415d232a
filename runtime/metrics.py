"""Prometheus metrics: one registry per runtime, so tests can run several side by side.

Labels are client ids, states, outcomes and causes: never a token, key or email.

Series per client exist only while the client is active. When a client's pool stops (the
client was removed, or it rested at zero for ``runtime.scaler.stop_idle_pool_after_s``),
every series labelled with it goes, counters and histograms included: ten thousand
clients at zero cost a scrape nothing. Its next activity starts its counters from zero,
which Prometheus reads as a counter reset (``rate`` and ``increase`` account for it). A
pool stops at least that grace after its client's last activity, so a scrape interval
shorter than the grace (60 s by default) loses no increment.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

WORKER_STATES = ("starting", "idle", "leased", "draining")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._forgotten: dict[str, int] = {}
        self.workers = Gauge("autonomite_pool_workers", "Workers by state.", ["client", "state"], registry=r)
        self.utilization = Gauge("autonomite_pool_utilization", "Leased / live workers.", ["client"], registry=r)
        self.min_idle = Gauge("autonomite_pool_min_idle", "Configured minimum idle workers.", ["client"], registry=r)
        self.max_size = Gauge("autonomite_pool_max_size", "Configured maximum workers.", ["client"], registry=r)
        self.target = Gauge("autonomite_pool_target", "Live workers the pool aims for.", ["client"], registry=r)
        self.backoff = Gauge(
            "autonomite_pool_start_backoff_seconds", "Delay before the next worker start after failures.",
            ["client"], registry=r,
        )
        self.triggers = Counter("autonomite_triggers", "Triggers by outcome.", ["client", "outcome"], registry=r)
        self.handoff_failures = Counter(
            "autonomite_handoff_failures", "Leased workers that did not take their session (each was retried or refused).",
            ["client", "cause"], registry=r,
        )
        self.scale_events = Counter(
            "autonomite_scale_events", "Resizes sent by the scaler.", ["client", "direction"], registry=r
        )
        self.worker_exits = Counter("autonomite_worker_exits", "Worker exits by cause.", ["client", "cause"], registry=r)
        self.worker_start_failures = Counter(
            "autonomite_worker_start_failures", "Workers that never became ready.", ["client"], registry=r
        )
        self.webhooks = Counter(
            "autonomite_livekit_webhooks", "Verified LiveKit webhook events.", ["client", "event"], registry=r
        )
        self.session_seconds = Counter(
            "autonomite_session_seconds", "Seconds of finished sessions, from the agent joining to the end.", ["client"],
            registry=r,
        )
        self.idle_worker_seconds = Counter(
            "autonomite_idle_worker_seconds", "Seconds the client's workers sat idle: what its warm capacity cost.",
            ["client"], registry=r,
        )
        self.session_webhooks = Counter(
            "autonomite_session_webhooks", "Session webhook attempts to clients by outcome: delivered, retried (an "
            "attempt failed, another follows) or failed (given up).", ["client", "outcome"], registry=r,
        )
        self.source_up = Gauge(
            "autonomite_client_source_up", "1 while the client source (Supabase) answers, 0 in an outage.", registry=r
        )
        self.source_bad_rows = Gauge(
            "autonomite_client_source_bad_rows", "1 for a client row that fails validation (skipped, or its last good "
            "configuration kept).", ["client"], registry=r,
        )
        self.source_rows_read = Counter(
            "autonomite_client_source_rows_read", "Rows of the clients table read: all of them at start, then "
            "only changed ones (runtime/clients/changes.py).", registry=r,
        )
        self.source_watcher_crashes = Counter(
            "autonomite_client_source_watcher_crashes", "Polls of the client source that crashed (a bug; the watcher "
            "polls on and the source shows down until a poll succeeds).", registry=r,
        )
        self.scaler_threshold = Gauge(
            "autonomite_scaler_threshold", "The scaler's utilization thresholds in force (runtime.scaler).", ["bound"],
            registry=r,
        )
        self.actor_restarts = Counter("autonomite_actor_restarts", "Actors restarted by the supervisor.", ["actor"], registry=r)
        self.dispatch_latency = Histogram(
            "autonomite_dispatch_latency_seconds", "Trigger received to the leased worker's job accepted (the 200).", ["client"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.start_to_ready = Histogram(
            "autonomite_worker_start_to_ready_seconds", "Worker start to registered with LiveKit.", ["client"],
            buckets=(0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 60),
            registry=r,
        )

    def set_scaler_thresholds(self, high_water: float, low_water: float) -> None:
        """Exported so that a dashboard draws utilization against the thresholds this runtime
        really uses (they change only with a restart), not against constants of its own."""
        self.scaler_threshold.labels("high_water").set(high_water)
        self.scaler_threshold.labels("low_water").set(low_water)

    def forgotten(self, client_id: str) -> int:
        """How many times this client's series were removed: a running pool that sees it
        change sets its gauges again (an old incarnation's stop may remove the new one's)."""
        return self._forgotten.get(client_id, 0)

    def forget_client(self, client_id: str) -> None:
        """Every series of this client goes (its pool stopped): see the module's docstring.
        Runs on the stopping pool's thread; prometheus_client's families are thread-safe."""
        self._forgotten[client_id] = self._forgotten.get(client_id, 0) + 1
        per_client = (
            self.workers, self.utilization, self.min_idle, self.max_size, self.target, self.backoff, self.triggers,
            self.handoff_failures, self.scale_events, self.worker_exits, self.worker_start_failures, self.webhooks,
            self.dispatch_latency, self.start_to_ready, self.session_seconds, self.idle_worker_seconds,
            self.session_webhooks,
        )
        for family in per_client:
            for labels in _label_sets(family, client_id):
                _remove(family, *labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label_sets(family: Counter | Gauge | Histogram, client_id: str) -> set[tuple[str, ...]]:
    """The label values of each of ``family``'s children labelled with this client."""
    found = set()
    for metric in family.collect():
        for sample in metric.samples:
            if sample.labels.get("client") == client_id:
                found.add(tuple(v for k, v in sample.labels.items() if k != "le"))  # a histogram's bucket
    return found


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
