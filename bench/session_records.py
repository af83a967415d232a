"""What session records cost: trigger latency with records and webhooks on against off, side
by side in one run, and how many records a second the record path sustains.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/session_records.py [--rounds 40] [--sessions 1000] [--chart docs/session_records.png]

1. Two ``autonomite serve`` (process backend) on one loopback livekit-server, each with one
   warm client (``min_idle: 2``): one records every trigger and sends its webhooks to a
   real HTTP receiver on loopback, the other runs with ``runtime.sessions.record: false``.
   Triggers alternate between them, ``--rounds`` each; the clock stops at the 200 (the
   worker accepted the job). p50 and p95, and their ratio.
2. ``--sessions`` sessions' worth of events (received, leased, answered, in the room, a
   user, the end: six per session, as the dispatcher and the pools tell them) told to a
   session log (``runtime/sessions/log.py``) as fast as a thread can, with webhooks on for
   the client: the time until every record and event is on disk (SQLite, WAL). Then a
   shipper (``runtime/sessions/shipper.py``) sends those records to a real PostgREST over
   PostgreSQL (``tests/supabase_stack.py``, as the tests run it): the time until Supabase
   holds every one.

Compare as ratios, side by side in one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.contract import Milestones
from bench.clients_at_zero import pct, timed
from bench.trigger_latency import machine
from runtime.dev.devserver import LiveKitServer
from runtime.sessions.log import SessionLog
from runtime.sessions.store import SqliteStore, connect
from tests.support import Client, LiveKitProject, Serve, WebhookReceiver, wait_until, write_config


def latency(work: Path, server: LiveKitServer, rounds: int) -> dict[str, list[float]]:
    project = LiveKitProject(server, "key-on", server.keys["key-on"])
    receiver = WebhookReceiver()
    serves: dict[str, tuple[Serve, Client]] = {}
    try:
        for name, record in (("on", True), ("off", False)):
            folder = work / name
            folder.mkdir()
            client = Client(f"c{name}", project, min_idle=2, max_size=4,
                            webhook_url=receiver.url(f"/{name}") if record else None)
            env = write_config(folder / "clients.yaml", [client], sessions={"record": record},
                               webhooks={"allow_private": True})
            serves[name] = (Serve(folder / "clients.yaml", env, folder / "serve.log").start(), client)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(rounds):
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                serve, client = serves[name]
                wait_until(lambda s=serve, c=client: s.pool(c.id)["idle"] >= 1, 60, "an idle worker")
                r, ms = timed(lambda s=serve, c=client, n=name: s.trigger(c, f"{n}-{i}"))
                assert r.status == 200, r.body
                times[name].append(ms)
                project.delete_room(f"{name}-{i}")
        wait_until(lambda: len(receiver.of("/on")) >= 2 * rounds, 60, "every webhook delivered")
        return times
    finally:
        for serve, _ in serves.values():
            serve.stop()
        receiver.close()


def throughput(work: Path, sessions: int) -> dict[str, float]:
    from runtime.sessions.shipper import Shipper
    from runtime.settings import SupabaseSettings
    from tests.supabase_stack import SupabaseStack

    store = SqliteStore(work / "records" / "sessions.sqlite")
    log = SessionLog(store, "process", has_webhook=lambda client: True).start()
    t0 = time.perf_counter()
    for n in range(sessions):
        sid, worker = uuid.uuid4().hex, f"w{n}"
        log.received(sid, "acme", "support", f"room-{n}", None, time.time())
        log.leased(sid, "acme", worker, "ws://127.0.0.1:7880")
        log.answered(sid, "acme", 200)
        log.progress("acme", worker, Milestones(in_room=True))
        log.progress("acme", worker, Milestones(True, True))
        log.progress("acme", worker, Milestones(True, True, "user_left"))
    told = time.perf_counter() - t0
    assert log.flush(120)
    sqlite_s = time.perf_counter() - t0
    log.stop()
    with connect(store.path) as db:
        events = db.execute("select count(*) from webhook_outbox").fetchone()[0]
    assert events == 2 * sessions and len(store.page(limit=sessions + 1)) == sessions

    (work / "supabase").mkdir()
    stack = SupabaseStack(work / "supabase").start()
    try:
        shipper = Shipper(store.path, SupabaseSettings(url=stack.url, service_key=stack.service_key))
        t0 = time.perf_counter()
        shipper.start()
        wait_until(lambda: shipper.status()["pending"] == 0, 300, "every record shipped")
        supabase_s = time.perf_counter() - t0
        shipper.stop()
        assert stack.sql("select count(*) from public.sessions").strip() == str(sessions)
    finally:
        stack.stop()
    return {"told_s": told, "sqlite_s": sqlite_s, "supabase_s": supabase_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-records-"))
    with LiveKitServer({"key-on": f"secret-{uuid.uuid4().hex}"}) as server:
        times = latency(work, server, args.rounds)
    rates = throughput(work, args.sessions)
    on, off = times["on"], times["off"]
    print(f"machine: {machine()}")
    print("| trigger to 200 | p50 (ms) | p95 (ms) |")
    print("| --- | ---: | ---: |")
    for name, values in (("records and webhooks on", on), ("records off", off)):
        print(f"| {name} | {pct(values, 0.5):.0f} | {pct(values, 0.95):.0f} |")
    print(f"on ÷ off: p50 {pct(on, 0.5) / pct(off, 0.5):.2f}, p95 {pct(on, 0.95) / pct(off, 0.95):.2f} "
          f"({args.rounds} triggers each, alternating)")
    n = args.sessions
    print()
    print(f"| {n:,} sessions (6 events each) | seconds | records per second |")
    print("| --- | ---: | ---: |")
    print(f"| told to the session log (the callers' cost) | {rates['told_s']:.3f} | {n / rates['told_s']:,.0f} |")
    print(f"| on disk: SQLite (WAL), with {2 * n:,} webhook events | {rates['sqlite_s']:.3f} | "
          f"{n / rates['sqlite_s']:,.0f} |")
    print(f"| in Supabase (PostgREST, batches of 500) | {rates['supabase_s']:.3f} | {n / rates['supabase_s']:,.0f} |")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        grouped_bars(args.chart, "Session records and webhooks: what they cost a trigger",
                     ["p50", "p95"],
                     Panel("trigger to 200 (ms)", {"records + webhooks on": [pct(on, 0.5), pct(on, 0.95)],
                                                   "records off": [pct(off, 0.5), pct(off, 0.95)]}))
        grouped_bars(args.chart.with_name(args.chart.stem + "_throughput.png"),
                     f"{n:,} sessions' records: how fast they are kept", ["records per second"],
                     Panel("records per second", {"SQLite": [n / rates["sqlite_s"]],
                                                  "Supabase": [n / rates["supabase_s"]]}))


if __name__ == "__main__":
    main()
