"""What a client at zero costs a scrape: nothing, once its pool stopped."""

from __future__ import annotations

from runtime.metrics import Metrics


def test_forgetting_a_client_removes_every_series_of_it_and_only_of_it():
    m = Metrics()
    for client in ("resting", "busy"):
        m.workers.labels(client, "idle").set(1)
        m.target.labels(client).set(1)
        m.triggers.labels(client, "dispatched").inc()
        m.worker_exits.labels(client, "session_end").inc()
        m.dispatch_latency.labels(client).observe(0.3)
        m.start_to_ready.labels(client).observe(1.2)
    m.source_bad_rows.labels("resting").set(0)  # the source's, not the pool's: it stays
    m.forget_client("resting")
    text = m.render().decode()
    assert [line for line in text.splitlines() if 'client="resting"' in line] == [
        'autonomite_client_source_bad_rows{client="resting"} 0.0'
    ]
    assert 'autonomite_dispatch_latency_seconds_count{client="busy"} 1.0' in text
    m.triggers.labels("resting", "dispatched").inc()  # active again: its counter starts afresh
    assert 'autonomite_triggers_total{client="resting",outcome="dispatched"} 1.0' in m.render().decode()
