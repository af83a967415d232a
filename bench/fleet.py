"""Many clients at once: time until every pool is warm, and the memory it all takes.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/fleet.py [--clients 100] [--compare-clients 20] [--chart docs/fleet.png]

One livekit-server on loopback holds one key pair per client (each client is its own
LiveKit project, as in production). Every client gets ``min_idle: 2``. The clock starts
when ``autonomite serve`` is launched and stops when ``/readyz`` answers 200 (every pool at
``min_idle``). Memory is then read as PSS (``/proc/PID/smaps_rollup``) summed over serve's
whole process tree: the runtime, the zygote and every worker.

Side by side in one run, at ``--compare-clients``: the zygote on and off (plain start).
Then the zygote alone at ``--clients``: the plain start is not run at that size, because it
needs about 100 MB and 3.4 s of CPU per worker (20 GB for 100 clients on this 24 GiB box).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trigger_latency import machine
from bench.worker_start import pss_mb, tree
from runtime.dev.devserver import LiveKitServer
from tests.support import Client, LiveKitProject, Serve, wait_until, write_config


def run(work: Path, server: LiveKitServer, count: int, zygote: bool) -> dict:
    clients = [
        Client(f"c{i:03d}", LiveKitProject(server, f"key{i:03d}", server.keys[f"key{i:03d}"]), min_idle=2, max_size=3)
        for i in range(count)
    ]
    folder = work / f"{count}-{'zygote' if zygote else 'plain'}"
    folder.mkdir()
    env = write_config(folder / "clients.yaml", clients, workers={"zygote": zygote, "ready_timeout_s": 600})
    serve = Serve(folder / "clients.yaml", env, folder / "serve.log")
    t0 = time.perf_counter()
    serve.start(wait_ready=False)
    try:
        wait_until(lambda: serve.get("/readyz").status == 200, 900, "every pool warm", interval=0.2)
        ready_s = time.perf_counter() - t0
        time.sleep(5)  # idle, as a warm fleet sits
        pids = tree(serve.proc.pid)
        total = pss_mb(pids)
        runtime = pss_mb([serve.proc.pid])
        workers = sum(p["total"] for p in serve.stats().values())
    finally:
        serve.stop()
    return {"clients": count, "kind": "zygote fork" if zygote else "plain start", "ready_s": ready_s,
            "pss_gb": total / 1024, "runtime_mb": runtime, "workers": workers,
            "per_worker_mb": (total - runtime) / max(workers, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--compare-clients", type=int, default=20)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    keys = {f"key{i:03d}": f"secret-{i:03d}-{uuid.uuid4().hex}" for i in range(max(args.clients, args.compare_clients))}
    rows = []
    with LiveKitServer(keys) as server:
        for count, zygote in ((args.compare_clients, True), (args.compare_clients, False), (args.clients, True)):
            rows.append(run(work, server, count, zygote))
            r = rows[-1]
            print(f"{r['clients']} clients, {r['kind']}: ready in {r['ready_s']:.1f} s, {r['workers']} workers, "
                  f"PSS {r['pss_gb']:.2f} GB", flush=True)
    print()
    print(f"machine: {machine()}")
    print("| clients × min_idle 2 | start | serve to /readyz 200 (s) | PSS, runtime + all workers (GB) | "
          "runtime (MB) | per worker, zygote included (MB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['clients']} | {r['kind']} | {r['ready_s']:.1f} | {r['pss_gb']:.2f} | {r['runtime_mb']:.0f} | "
              f"{r['per_worker_mb']:.1f} |")
    z, p = rows[0], rows[1]
    print(f"at {args.compare_clients} clients, plain / zygote: time to ready {p['ready_s'] / z['ready_s']:.1f}x, "
          f"memory {p['pss_gb'] / z['pss_gb']:.1f}x")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        names = [f"{r['clients']} clients, {r['kind']}" for r in rows]
        grouped_bars(args.chart, "Every pool warm (min_idle 2 per client), one run", names,
                     Panel("serve to /readyz 200 (s)", {"s": [r["ready_s"] for r in rows]}, "{:.1f}"),
                     Panel("PSS, runtime + workers (GB)", {"GB": [r["pss_gb"] for r in rows]}, "{:.2f}"))


if __name__ == "__main__":
    main()
