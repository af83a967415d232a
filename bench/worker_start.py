"""Worker start-to-ready time and idle memory: docker against process, side by side in one run.

    .venv/bin/python bench/worker_start.py [--workers 10]

Each round starts one worker on each backend (alternating which goes first), times start()
until the worker reports itself registered with a real livekit-server on loopback, lets it
sit idle 2 s, then reads its memory: the RSS of every process of the worker (for docker, the
container's processes as the host sees them, from ``docker top``) and, for docker, the
container's cgroup usage too. Needs a Docker engine; it builds the registry-free
test image (``tests.support.build_test_image``).
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

import docker  # noqa: E402

from actors._watch import read_status  # noqa: E402
from bench.trigger_latency import machine  # noqa: E402
from agent.worker import WorkerConfig  # noqa: E402
from runtime.backends import ProcessBackend, WorkerSpec  # noqa: E402
from runtime.backends.docker import DockerBackend  # noqa: E402
from runtime.devserver import LiveKitServer, free_port  # noqa: E402
from tests.support import TEST_IMAGE, build_test_image, wait_until  # noqa: E402



def spec_for(server: LiveKitServer, key: str, secret: str) -> WorkerSpec:
    worker_id = uuid.uuid4().hex[:8]
    port = free_port()
    return WorkerSpec(
        client_id="bench", worker_id=worker_id, agent_name=f"bench--{worker_id}", status_port=port,
        credentials_fp="", image=TEST_IMAGE,
        env={
            "LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret,
            **WorkerConfig(worker_id, "bench", f"bench--{worker_id}", port, []).to_env(),
        },
    )


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += children(int(child))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=10)
    args = parser.parse_args()
    key, secret = "benchkey", "bench-" + uuid.uuid4().hex
    engine = docker.from_env(version="auto")
    image = build_test_image(engine, Path(tempfile.mkdtemp(prefix="image-")))
    volumes = image["volumes"]
    backends = {
        "process": ProcessBackend(log_dir=Path("/tmp/bench-workers")),
        "docker": DockerBackend(log_dir=Path("/tmp/bench-workers"), volumes=volumes),
    }
    results: dict[str, dict[str, list[float]]] = {name: {"ready": [], "rss": [], "cgroup": []} for name in backends}
    with LiveKitServer({key: secret}) as server:
        for i in range(args.workers):
            order = ["process", "docker"] if i % 2 == 0 else ["docker", "process"]
            for name in order:
                backend, spec = backends[name], spec_for(server, key, secret)
                t0 = time.perf_counter()
                handle = backend.start(spec)
                wait_until(lambda: (read_status(spec.status_port) or {}).get("registered"), 60, "registration",
                           interval=0.01)
                results[name]["ready"].append(time.perf_counter() - t0)
                time.sleep(2)  # idle, as a warm worker sits
                if name == "process":
                    results[name]["rss"].append(rss_mb(children(int(handle.ref))))
                else:
                    c = engine.containers.get(handle.ref)
                    pids = [int(row[1]) for row in c.top()["Processes"]]
                    results[name]["rss"].append(rss_mb(pids))
                    results[name]["cgroup"].append(c.stats(stream=False)["memory_stats"]["usage"] / 2**20)
                backend.stop(handle)
                backend.wait(handle)
            print(f"round {i + 1}: " + ", ".join(
                f"{n} ready {results[n]['ready'][-1]:.2f} s rss {results[n]['rss'][-1]:.0f} MB" for n in order), flush=True)
    print()
    print(f"machine: {machine()}")
    print(f"workers: {args.workers} per backend, alternating")
    print("| backend | start-to-ready p50 (s) | max (s) | idle RSS p50 (MB) | cgroup usage p50 (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        cg = f"{statistics.median(r['cgroup']):.0f}" if r["cgroup"] else "n/a"
        print(f"| {name} | {statistics.median(r['ready']):.2f} | {max(r['ready']):.2f} | "
              f"{statistics.median(r['rss']):.0f} | {cg} |")
    ratio = statistics.median(results["docker"]["ready"]) / statistics.median(results["process"]["ready"])
    print(f"docker / process start-to-ready at p50: {ratio:.2f}x")


if __name__ == "__main__":
    main()
