"""Thousands of clients at zero beside one warm client: what they cost, and how fast each is served.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/clients_at_zero.py [--sizes 100 1000 10000] [--rounds 10] [--burst 200]
                                              [--chart docs/clients_at_zero.png]

For each size, one run of ``autonomite serve`` (process backend, the zygote) with that many
clients at ``min_idle: 0`` plus one warm client (``min_idle: 2``), every client its own key
pair on one loopback livekit-server. It measures:

- serve's start to ``/readyz`` 200, then its RSS and threads, and its CPU over 10 s idle;
- ``GET /metrics`` (size, time) and the admin stats for one client and for a page of 100;
- trigger -> agent in the room (the 200: it answers once the worker accepted the job),
  warm against from zero, alternating, ``--rounds`` of each: p50 and p95;
- ``--burst`` triggers across as many clients at zero within 10 s: how many were served,
  and the p50 and p95 time to the agent.

Compare as ratios, side by side in one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trigger_latency import machine
from runtime.dev.devserver import LiveKitServer
from tests.support import Client, LiveKitProject, Serve, wait_until, write_config

WARM = "warm"


def rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - t0) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def session(serve: Serve, client: Client, room: str) -> float | None:
    """Trigger -> agent in the room (ms), then end the session; None if refused."""
    r, ms = timed(lambda: serve.trigger(client, room))
    client.project.delete_room(room) if r.status == 200 else None
    return ms if r.status == 200 else None


def run(work: Path, server: LiveKitServer, size: int, rounds: int, burst: int) -> dict:
    project = lambda i: LiveKitProject(server, f"key{i:05d}", server.keys[f"key{i:05d}"])  # noqa: E731
    warm = Client(WARM, project(0), min_idle=2, max_size=4)
    zero = [Client(f"z{i:05d}", project(i + 1), min_idle=0, max_size=1) for i in range(size)]
    folder = work / f"{size}"
    folder.mkdir()
    env = write_config(folder / "clients.yaml", [warm, *zero], dispatch={"max_wait_s": 30},
                       workers={"ready_timeout_s": 120})
    serve = Serve(folder / "clients.yaml", env, folder / "serve.log")
    t0 = time.perf_counter()
    serve.start(wait_ready=False)
    try:
        wait_until(lambda: serve.get("/readyz").status == 200, 600, "ready", interval=0.2)
        ready_s = time.perf_counter() - t0
        pid = serve.proc.pid
        before = cpu_s(pid)
        time.sleep(10)  # idle, as a quiet fleet sits: what the runtime burns doing nothing
        idle_cpu = (cpu_s(pid) - before) / 10 * 100
        rss, threads = rss_mb(pid), len(os.listdir(f"/proc/{pid}/task"))
        metrics, metrics_ms = timed(serve.metrics)
        _, one_ms = timed(lambda: serve.get(f"/api/v1/containers/pool/stats?client={zero[size // 2].id}", serve.admin))
        _, page_ms = timed(lambda: serve.get("/api/v1/containers/pool/stats?limit=100", serve.admin))

        warm_ms, zero_ms = [], []
        for i in range(rounds):  # alternating: the same moment's noise for both
            warm_ms.append(session(serve, warm, f"warm-{i}"))
            zero_ms.append(session(serve, zero[i], f"zero-{i}"))
        refused = sum(v is None for v in warm_ms + zero_ms)

        burst = min(burst, size - rounds)  # each on a client of its own, at zero until then
        burst_ms: list[float | None] = []
        lock = threading.Lock()

        def one(k: int) -> None:
            time.sleep(10 * k / burst)  # spread over 10 s
            ms = session(serve, zero[rounds + k], f"burst-{k}")
            with lock:
                burst_ms.append(ms)

        with ThreadPoolExecutor(min(burst, 64)) as pool:
            list(pool.map(one, range(burst)))
    finally:
        serve.stop()
    served = [v for v in burst_ms if v is not None]
    return {
        "size": size, "ready_s": ready_s, "rss_mb": rss, "threads": threads, "idle_cpu_pct": idle_cpu,
        "metrics_kb": len(metrics.encode()) / 1024, "metrics_ms": metrics_ms, "one_ms": one_ms, "page_ms": page_ms,
        "warm_p50": pct([v for v in warm_ms if v], 0.5), "warm_p95": pct([v for v in warm_ms if v], 0.95),
        "zero_p50": pct([v for v in zero_ms if v], 0.5), "zero_p95": pct([v for v in zero_ms if v], 0.95),
        "refused": refused, "burst_served": len(served), "burst": burst,
        "burst_p50": pct(served, 0.5), "burst_p95": pct(served, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-zero-"))
    keys = {f"key{i:05d}": f"secret-{i:05d}-{uuid.uuid4().hex}" for i in range(max(args.sizes) + 1)}
    rows = []
    with LiveKitServer(keys) as server:
        for size in args.sizes:
            rows.append(run(work, server, size, args.rounds, args.burst))
            print(rows[-1], flush=True)
    print()
    print(f"machine: {machine()}")
    print("| clients at zero (+1 warm) | ready (s) | RSS (MB) | threads | idle CPU (% of a core) | /metrics | "
          "stats, one client | stats, a page of 100 | warm p50 / p95 (ms) | from zero p50 / p95 (ms) | "
          "zero ÷ warm, p50 | refused | burst served | burst p50 / p95 (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['size']:,} | {r['ready_s']:.1f} | {r['rss_mb']:.0f} | {r['threads']} | {r['idle_cpu_pct']:.1f} | "
              f"{r['metrics_ms']:.0f} ms, {r['metrics_kb']:.0f} KB | {r['one_ms']:.0f} ms | {r['page_ms']:.0f} ms | "
              f"{r['warm_p50']:.0f} / {r['warm_p95']:.0f} | {r['zero_p50']:.0f} / {r['zero_p95']:.0f} | "
              f"{r['zero_p50'] / r['warm_p50']:.2f} | {r['refused']} | {r['burst_served']} of {r['burst']} | "
              f"{r['burst_p50']:.0f} / {r['burst_p95']:.0f} |")
    first = rows[0]
    for r in rows[1:]:
        print(f"{r['size']:,} against {first['size']:,} clients: warm p50 {r['warm_p50'] / first['warm_p50']:.2f}x, "
              f"from zero p50 {r['zero_p50'] / first['zero_p50']:.2f}x")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        names = [f"{r['size']:,} at zero" for r in rows]
        grouped_bars(args.chart, "Clients at zero beside one warm client, one run per size", names,
                     Panel("trigger -> agent, p50 (ms)", {"warm": [r["warm_p50"] for r in rows],
                                                         "from zero": [r["zero_p50"] for r in rows]}),
                     Panel("serve to ready (s)", {"s": [r["ready_s"] for r in rows]}, "{:.1f}"),
                     Panel("serve RSS (MB)", {"MB": [r["rss_mb"] for r in rows]}))


if __name__ == "__main__":
    main()
