"""What a forked worker's isolation costs: fork to registered, and idle PSS, side by side in one run.

    .venv/bin/python bench/isolation_cost.py [--workers 10] [--chart docs/isolation_cost.png]

Four process backends, each with its own zygote, take turns (rotating which goes first):

- **none**: ``runtime.isolation.enabled: false``, the worker as before issue 18;
- **identity**: a uid of its own, no capabilities, no_new_privs, not dumpable, seccomp;
- **identity + cgroups**: and a memory and pids cgroup of its own (the default);
- **identity + cgroups + namespaces**: and a pid and mount namespace of its own.

The clock runs from ``start()`` to the worker's status saying it is registered with a
real livekit-server on loopback. Every worker then stays up, idle, as a warm pool's do,
and the bench reads each one's PSS (``/proc/PID/smaps_rollup``; a page shared by n
processes counts 1/n to each, so the zygote's shared pages are counted fairly).
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

from actors._watch import read_status
from agent.contract import StatusAddress
from bench.trigger_latency import machine
from bench.worker_start import pss_mb, spec_for, tree
from runtime.backends import ProcessBackend, WorkerHandle
from runtime.dev.devserver import LiveKitServer
from runtime.settings import IsolationSettings
from tests.support import wait_until


def backends(work: Path) -> dict[str, ProcessBackend]:
    kinds = {
        "none": ProcessBackend(work / "none", isolation=IsolationSettings(enabled=False)),
        "identity": ProcessBackend(work / "identity"),
        "identity + cgroups": ProcessBackend(work / "cgroups"),
        "identity + cgroups + namespaces": ProcessBackend(work / "namespaces", isolation=IsolationSettings(namespaces=True)),
    }
    identity_only = kinds["identity"].isolation
    identity_only.cgroups.close()  # the bench's own variant: no product setting turns cgroups off
    identity_only.cgroups = None
    for backend in kinds.values():
        wait_until(lambda: backend.zygote.pid, 120, "the zygote to boot (before any clock starts)")
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    key, secret = "benchkey", "bench-" + uuid.uuid4().hex
    kinds = backends(Path(tempfile.mkdtemp(prefix="bench-isolation-")))
    names = list(kinds)
    ready: dict[str, list[float]] = {n: [] for n in names}
    handles: dict[str, list[WorkerHandle]] = {n: [] for n in names}
    with LiveKitServer({key: secret}) as server:
        try:
            for i in range(args.workers):
                order = names[i % len(names):] + names[: i % len(names)]
                for name in order:
                    spec = spec_for(server, key, secret)
                    t0 = time.perf_counter()
                    handles[name].append(kinds[name].start(spec))
                    address = StatusAddress("127.0.0.1", spec.status_port)
                    wait_until(lambda: (read_status(address) or {}).get("registered"), 120, "registration",
                               interval=0.002)
                    ready[name].append(time.perf_counter() - t0)
                print(f"round {i + 1}: " + ", ".join(f"{n} {ready[n][-1] * 1000:.0f} ms" for n in order), flush=True)
            time.sleep(3)  # idle, as a warm worker sits; then read memory with every worker up
            pss = {n: [pss_mb(tree(int(h.ref))) for h in handles[n]] for n in names}
        finally:
            for name in names:
                for h in handles[name]:
                    kinds[name].stop(h)
                    kinds[name].wait(h)
                kinds[name].close()
    print()
    print(f"machine: {machine()}")
    print(f"workers: {args.workers} per kind, forked by each kind's own zygote, all idle at once when memory is read")
    print("| isolation | fork to registered p50 (ms) | p95 (ms) | max (ms) | idle PSS per worker p50 (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in names:
        r = sorted(ready[n])
        print(f"| {n} | {statistics.median(r) * 1000:.1f} | {r[int(0.95 * (len(r) - 1))] * 1000:.1f} | "
              f"{max(r) * 1000:.1f} | {statistics.median(pss[n]):.1f} |")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        grouped_bars(args.chart, f"Forked worker: cost of isolation, {args.workers} workers of each kind, one run",
                     names,
                     Panel("fork to registered, p50 (ms)", {"p50": [statistics.median(ready[n]) * 1000 for n in names]},
                           "{:.1f}"),
                     Panel("idle PSS per worker, p50 (MB)", {"PSS": [statistics.median(pss[n]) for n in names]},
                           "{:.1f}"))


if __name__ == "__main__":
    main()
