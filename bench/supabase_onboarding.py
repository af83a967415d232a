"""From a row in Supabase to a warm pool: onboarding and updating N clients at once.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/supabase_onboarding.py [--counts 1 10 50] [--chart docs/supabase_onboarding.png]

A real Supabase data API on loopback (PostgreSQL, PostgREST, nginx: ``tests/supabase_stack.py``),
one real livekit-server, and ``autonomite serve`` reading its clients from the table with
``poll_interval_s: 1``. For each N: insert N client rows in one request and time, per client,
until its pool has an idle worker registered with LiveKit; then change every client's agent
prompt in one request and time until each client's idle worker is a new one (the old one
replaced); then delete the rows and wait for the pools to drain. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trigger_latency import machine
from runtime.dev.devserver import LiveKitServer
from tests.integration.test_supabase import row, source_config
from tests.supabase_stack import SupabaseStack, missing
from tests.support import Client, LiveKitProject, Serve, wait_until


def idle_workers(serve: Serve) -> dict[str, set[str]]:
    return {cid: {w["id"] for w in p["workers"] if w["state"] == "idle"} for cid, p in serve.stats().items()}


def timed(serve: Serve, ids: list[str], done, what: str, timeout: float = 600) -> list[float]:
    """Seconds from now until ``done(client_id, idle_ids)`` holds, for each client."""
    t0, took = time.monotonic(), {}
    deadline = t0 + timeout
    while len(took) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {len(ids) - len(took)} clients not done within {timeout} s")
        idle = idle_workers(serve)
        for cid in ids:
            if cid not in took and done(cid, idle.get(cid, set())):
                took[cid] = time.monotonic() - t0
        time.sleep(0.05)
    return [took[cid] for cid in ids]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    if missing():
        sys.exit(f"cannot run: {missing()}")
    work = Path(tempfile.mkdtemp(prefix="bench-sb-"))
    stack = SupabaseStack(work).start()
    project = LiveKitProject(LiveKitServer({"benchkey": "bench-" + uuid.uuid4().hex}), "benchkey", "")
    project.secret = project.server.keys["benchkey"]
    project.server.start()
    env = source_config(work / "clients.yaml", stack, poll_interval_s=1.0)
    serve = Serve(work / "clients.yaml", env, work / "serve.log").start()
    from supabase import create_client

    table = create_client(stack.url, stack.service_key).table("clients")
    results: dict[int, tuple[list[float], list[float]]] = {}
    try:
        for n in args.counts:
            clients = [Client(f"c{n}x{i}", project, min_idle=1, max_size=1) for i in range(n)]
            ids = [c.id for c in clients]
            table.insert([row(c) for c in clients]).execute()
            onboard = timed(serve, ids, lambda cid, idle: len(idle) >= 1, f"onboarding {n}")
            before = idle_workers(serve)
            agents = [{"name": "support", "system_prompt": f"Updated {uuid.uuid4().hex[:6]}."}]
            table.update({"agents": agents}).in_("id", ids).execute()
            update = timed(serve, ids, lambda cid, idle: bool(idle) and not idle & before[cid], f"updating {n}")
            results[n] = (onboard, update)
            print(f"{n:3d} clients: onboard p50 {statistics.median(onboard):.2f} s, max {max(onboard):.2f} s; "
                  f"update p50 {statistics.median(update):.2f} s, max {max(update):.2f} s", flush=True)
            table.delete().in_("id", ids).execute()
            wait_until(lambda: not set(ids) & set(serve.stats()), 600, f"{n} pools to drain")
    finally:
        serve.stop()
        project.server.stop()
        stack.stop()
    print()
    print(f"machine: {machine()}")
    print("| clients at once | insert to ready p50 (s) | max (s) | update to replaced p50 (s) | max (s) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, (onboard, update) in results.items():
        print(f"| {n} | {statistics.median(onboard):.2f} | {max(onboard):.2f} | "
              f"{statistics.median(update):.2f} | {max(update):.2f} |")
    if args.chart:
        chart(results, args.chart)
        print(f"chart: {args.chart}")


def chart(results: dict[int, tuple[list[float], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    for i, (label, color) in enumerate((("insert to ready", "#4c72b0"), ("update to replaced", "#dd8452"))):
        p50 = [statistics.median(results[n][i]) for n in counts]
        worst = [max(results[n][i]) for n in counts]
        xs = [j + i * 0.38 for j in range(len(counts))]
        ax.bar(xs, worst, width=0.36, color=color, alpha=0.35, label=f"{label}: max")
        bars = ax.bar(xs, p50, width=0.36, color=color, label=f"{label}: p50")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in p50], fontsize=8)
    ax.set_xticks([j + 0.19 for j in range(len(counts))], [f"{n} at once" for n in counts])
    ax.set_ylabel("seconds")
    ax.set_title("Supabase row to warm pool (poll every 1 s), one run")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
