"""What watching many swarm workers costs the manager: one poll per worker, or one shared board.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/swarm_watch.py [--workers 50,200] [--seconds 20] [--chart docs/swarm_watch.png]

A private dockerd in swarm mode (tests/swarm_stack.py, one node) runs N services labelled
as workers; each runs ``sleep`` in the worker image's base, so only the watching costs.
Side by side in one run, for each N, the runtime's two ways of waiting for N workers:

- **per worker** (before): one thread per worker asks the manager for its service and its
  tasks every 0.25 s, over a connection of its own (the loop ``SwarmBackend.wait`` had);
- **board** (now): the same N threads wait on ``runtime.backends.swarm_board.Board``, which
  lists services and tasks once per 0.25 s for all of them.

Measured over ``--seconds``: the CPU the manager (dockerd) and the waiting process spent,
and the requests made. Nothing ends during the window: this is the steady cost of N idle
warm workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker
from docker.types import RestartPolicy, ServiceMode

from bench.trigger_latency import machine
from runtime.backends.base import LABEL_WORKER
from runtime.backends.swarm_board import Board, ended
from runtime.dev.image import ensure_base
from tests.support import wait_until
from tests.swarm_stack import PrivateSwarm

TICK_S = 0.25  # both ways poll at the same rate


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_worker(url: str, refs: list[str], stop: threading.Event, counter: list[int]) -> list[threading.Thread]:
    lock = threading.Lock()

    def poll(ref: str) -> None:
        engine = docker.DockerClient(base_url=url, version="auto", timeout=60)
        try:
            while not stop.is_set():
                engine.services.get(ref).tasks()
                with lock:
                    counter[0] += 2  # inspect the service, list its tasks
                stop.wait(TICK_S)
        finally:
            engine.close()

    return [threading.Thread(target=poll, args=(ref,), daemon=True) for ref in refs]


def on_board(board: Board, refs: list[str], seconds: float) -> list[threading.Thread]:
    def wait(ref: str) -> None:
        assert board.wait(lambda snap: ended(ref, snap, lambda _node: False), timeout=seconds) is None, ref

    return [threading.Thread(target=wait, args=(ref,), daemon=True) for ref in refs]


def measure(swarm: PrivateSwarm, threads: list[threading.Thread], seconds: float, stop: threading.Event | None):
    manager, me = swarm.pid, os.getpid()
    before = cpu_seconds(manager), cpu_seconds(me), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)  # the measured window itself, not a synchronisation
    if stop is not None:
        stop.set()
    for t in threads:
        t.join(30)
    elapsed = time.perf_counter() - before[2]
    return (cpu_seconds(manager) - before[0]) / elapsed * 100, (cpu_seconds(me) - before[1]) / elapsed * 100, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="50,200", help="comma-separated counts of idle workers")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--chart", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="bench-swarm-watch-"))
    host = docker.from_env(version="auto", timeout=600)
    base = ensure_base(host)
    swarm = PrivateSwarm(work / "dockerd-swarm.log").start()
    rows: list[tuple[int, str, float, float, float]] = []
    try:
        image = swarm.load(host, base)
        services = []
        for n in counts:
            while len(services) < n:
                services.append(swarm.engine.services.create(
                    image, command=["sleep", "infinity"], name=f"watch-{len(services)}",
                    labels={LABEL_WORKER: f"w{len(services)}"}, mode=ServiceMode("replicated", replicas=1),
                    restart_policy=RestartPolicy(condition="none"), networks=["host"]))
            wait_until(lambda: sum(t["Status"]["State"] == "running" for t in swarm.engine.api.tasks()) >= n,
                       300, f"{n} services running")
            refs = [s.id[:12] for s in services[:n]]
            counter, stop = [0], threading.Event()
            manager, me, elapsed = measure(swarm, per_worker(swarm.url, refs, stop, counter), args.seconds, stop)
            rows.append((n, "per worker", manager, me, counter[0] / elapsed))
            board = Board(lambda: docker.DockerClient(base_url=swarm.url, version="auto", timeout=60))
            manager, me, elapsed = measure(swarm, on_board(board, refs, args.seconds), args.seconds, None)
            rows.append((n, "board", manager, me, board.listings * 2 / elapsed))
    finally:
        swarm.stop()
    print(f"\n{args.seconds:g} s window per row, polling every {TICK_S:g} s\n")
    print("| idle workers | watched by | manager (dockerd) CPU % | waiting process CPU % | requests/s |")
    print("|---|---|---|---|---|")
    for n, how, manager, me, rate in rows:
        print(f"| {n} | {how} | {manager:.1f} | {me:.1f} | {rate:.0f} |")
    print("\n| idle workers | manager CPU, per worker ÷ board |\n|---|---|")
    for i in range(0, len(rows), 2):
        print(f"| {rows[i][0]} | {rows[i][2] / max(rows[i + 1][2], 0.1):.1f}× |")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        labels = [f"{n} workers" for n in counts]
        grouped_bars(args.chart, "Watching idle swarm workers: CPU % (of one core)", labels,
                     Panel("manager (dockerd) CPU %", {"per worker": [r[2] for r in rows[0::2]],
                                                       "board": [r[2] for r in rows[1::2]]}, "{:.1f}"),
                     Panel("waiting process CPU %", {"per worker": [r[3] for r in rows[0::2]],
                                                     "board": [r[3] for r in rows[1::2]]}, "{:.1f}"))


if __name__ == "__main__":
    main()
