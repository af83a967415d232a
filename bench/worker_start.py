"""Worker start-to-ready and idle memory: zygote fork, plain start and docker, side by side in one run.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/worker_start.py [--workers 10] [--no-docker] [--chart docs/worker_start.png]

Each round starts one worker on each backend (rotating which goes first) and times
``start()`` until the worker's status says it is registered with a real livekit-server on
loopback. Every worker stays up, idle, until the end, as a warm pool's do; then the bench
reads each worker's memory as PSS (``/proc/PID/smaps_rollup``, summed over the worker's
processes: a page shared by n processes counts 1/n to each), so the zygote's shared pages
are counted fairly. The zygote itself is reported on its own line.

docker needs an engine; it runs the worker image as deployed (``autonomite image build``).
"""

from __future__ import annotations

import argparse
import atexit
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors._watch import read_status
from agent.contract import StatusAddress, WorkerConfig
from bench.trigger_latency import machine
from runtime.backends import ProcessBackend, WorkerBackend, WorkerHandle, WorkerSpec
from runtime.backends.ports import free_port
from runtime.dev.devserver import LiveKitServer
from tests.support import wait_until

IMAGE = "autonomite-agent:bench"


def spec_for(server: LiveKitServer, key: str, secret: str) -> WorkerSpec:
    worker_id = uuid.uuid4().hex[:8]
    port = free_port()
    return WorkerSpec(
        client_id="bench", worker_id=worker_id, agent_name=f"bench--{worker_id}", status_port=port,
        credentials_fp="", image=IMAGE,
        env={
            "LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret,
            **WorkerConfig(worker_id, "bench", f"bench--{worker_id}", port, []).to_env(),
        },
    )


def pss_mb(pids: list[int]) -> float:
    """Proportional set size, summed: shared pages are split among the processes sharing them."""
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the thread or process ended meanwhile
            continue
        for child in children:
            out += tree(int(child))
    return out


ENGINES: dict[str, object] = {}  # kind -> the docker.DockerClient its containers run on


def worker_pids(name: str, handle: WorkerHandle) -> list[int]:
    if name not in ENGINES:
        return tree(int(handle.ref))
    engine = ENGINES[name]
    label = f"autonomite.worker={handle.worker_id}"
    [container] = engine.containers.list(filters={"label": label})
    return [int(row[1]) for row in container.top()["Processes"]]


def backends(work: Path, with_docker: bool, with_swarm: bool) -> dict[str, WorkerBackend]:
    found: dict[str, WorkerBackend] = {
        "zygote fork": ProcessBackend(log_dir=work / "zygote", zygote=True),
        "plain start": ProcessBackend(log_dir=work / "plain", zygote=False),
    }
    if with_docker:
        import docker

        from runtime.backends.docker import DockerBackend
        from runtime.dev.image import build
        from runtime.instance import Instance

        built = build(docker.from_env(version="auto", timeout=600), IMAGE)
        print(f"image {built.tag}: {built.size_mb:.0f} MB ({'reused' if built.reused else 'built'} in {built.seconds:.0f} s)")
        found["docker"] = DockerBackend(log_dir=work / "docker", instance=Instance.claim(work / "state-docker"))
        ENGINES["docker"] = docker.from_env(version="auto")
        if with_swarm:  # a private engine in swarm mode, one node (tests/swarm_stack.py)
            from runtime.backends.swarm import SwarmBackend
            from tests.swarm_stack import PrivateSwarm

            swarm = PrivateSwarm(work / "dockerd-swarm.log").start()
            atexit.register(swarm.stop)
            swarm.load(ENGINES["docker"], IMAGE)
            found["swarm"] = SwarmBackend(log_dir=work / "swarm", instance=Instance.claim(work / "state-swarm"),
                                          engine_url=swarm.url)
            ENGINES["swarm"] = swarm.engine
    zygote = found["zygote fork"].zygote
    wait_until(lambda: zygote.pid, 120, "the zygote to boot (before any clock starts)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--swarm", action="store_true", help="also a one-node swarm (a private dockerd)")
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    key, secret = "benchkey", "bench-" + uuid.uuid4().hex
    kinds = backends(Path(tempfile.mkdtemp(prefix="bench-start-")), not args.no_docker, args.swarm)
    names = list(kinds)
    ready: dict[str, list[float]] = {n: [] for n in names}
    removal: dict[str, list[float]] = {n: [] for n in names}
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
                               interval=0.005)
                    ready[name].append(time.perf_counter() - t0)
                print(f"round {i + 1}: " + ", ".join(f"{n} {ready[n][-1]:.2f} s" for n in order), flush=True)
            time.sleep(3)  # idle, as a warm worker sits; then read memory with every worker up
            pss = {n: [pss_mb(worker_pids(n, h)) for h in handles[n]] for n in names}
            zygote_pss = pss_mb([kinds["zygote fork"].zygote.pid])
        finally:
            for name in names:
                for h in handles[name]:
                    t0 = time.perf_counter()
                    kinds[name].stop(h)
                    if name in ENGINES:  # until its container is gone (Swarm removes it asynchronously)
                        engine, label = ENGINES[name], f"autonomite.worker={h.worker_id}"
                        wait_until(lambda: not engine.containers.list(all=True, filters={"label": label}), 60,
                                   "the container gone", interval=0.05)
                    removal[name].append(time.perf_counter() - t0)
                    kinds[name].wait(h)
                kinds[name].close()
    print()
    print(f"machine: {machine()}")
    print(f"workers: {args.workers} per kind, all idle at once when memory is read")
    print("| kind | start-to-ready p50 (s) | p95 (s) | max (s) | idle PSS per worker p50 (MB) | stop to gone p50 (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in names:
        r = sorted(ready[n])
        print(f"| {n} | {statistics.median(r):.3f} | {r[int(0.95 * (len(r) - 1))]:.3f} | {max(r):.3f} | "
              f"{statistics.median(pss[n]):.1f} | {statistics.median(removal[n]):.2f} |")
    print(f"| (the zygote itself, once per runtime) | | | | {zygote_pss:.1f} | |")
    plain, fork = statistics.median(ready["plain start"]), statistics.median(ready["zygote fork"])
    print(f"plain / zygote start-to-ready at p50: {plain / fork:.1f}x; "
          f"idle PSS: {statistics.median(pss['plain start']) / statistics.median(pss['zygote fork']):.1f}x")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        grouped_bars(args.chart, f"Worker start and idle memory, {args.workers} workers of each kind, one run", names,
                     Panel("start to registered, p50 (s)", {"p50": [statistics.median(ready[n]) for n in names]}, "{:.2f}"),
                     Panel("idle PSS per worker, p50 (MB)", {"PSS": [statistics.median(pss[n]) for n in names]}))

if __name__ == "__main__":
    main()
