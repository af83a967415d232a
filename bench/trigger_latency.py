"""Trigger to agent-in-room latency: warm pool against cold start, side by side in one run.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/trigger_latency.py [--sessions 30] [--chart docs/trigger_latency.png]

warm: ``POST /api/v1/trigger`` on a running ``autonomite serve`` whose pool has an idle,
      registered worker; stop the clock when LiveKit lists the agent participant as ACTIVE.
cold: the same agent program started at trigger time (what you get without a pool): start
      the worker, wait until it registered, create the dispatch; same stop condition.

For warm sessions it also records when the 200 came back: since a 200 means the worker
accepted the job (runtime/livekit/handoff.py), that is the caller's wait.

The two kinds alternate, session by session, so machine noise hits both alike. A real
livekit-server runs on loopback; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from livekit import api

from actors._watch import read_status
from agent.contract import StatusAddress, WorkerConfig
from runtime.backends import ProcessBackend, WorkerSpec
from runtime.backends.ports import free_port
from runtime.dev.devserver import LiveKitServer
from tests.support import Client, LiveKitProject, Serve, wait_until, write_config


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) // 1024**2
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Python {platform.python_version()}, {platform.platform()}"


class ArrivalWatch:
    """Polls LiveKit every 5 ms, over one kept-alive connection, for an ACTIVE agent in a room.

    Started before the clock, so the detection delay is a few ms and the same for both kinds.
    """

    def __init__(self, project: LiveKitProject) -> None:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._api = asyncio.run_coroutine_threadsafe(self._make(project), self._loop).result()

    async def _make(self, project: LiveKitProject) -> api.LiveKitAPI:
        return api.LiveKitAPI(project.url.replace("ws://", "http://"), project.key, project.secret)

    def watch(self, room: str):  # a concurrent future of the arrival time
        async def poll() -> float:
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:
                resp = await self._api.room.list_participants(api.ListParticipantsRequest(room=room))
                for p in resp.participants:
                    if p.kind == api.ParticipantInfo.Kind.AGENT and p.state == api.ParticipantInfo.State.ACTIVE:
                        return time.perf_counter()
                await asyncio.sleep(0.005)
            raise TimeoutError(f"no agent in {room}")

        return asyncio.run_coroutine_threadsafe(poll(), self._loop)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._api.aclose(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)


def warm_session(serve: Serve, client: Client, project: LiveKitProject, arrivals: ArrivalWatch) -> tuple[float, float]:
    """(trigger to 200, trigger to agent ACTIVE in the room)."""
    wait_until(lambda: serve.pool(client.id)["idle"] >= 1, 60, "an idle worker")
    room = f"warm-{uuid.uuid4().hex[:8]}"
    arrived = arrivals.watch(room)
    t0 = time.perf_counter()
    r = serve.trigger(client, room)
    answered = time.perf_counter() - t0
    assert r.status == 200, r.body
    elapsed = arrived.result(timeout=70) - t0
    project.delete_room(room)
    return answered, elapsed


def cold_session(backend: ProcessBackend, project: LiveKitProject, arrivals: ArrivalWatch) -> float:
    worker_id = uuid.uuid4().hex[:8]
    room = f"cold-{worker_id}"
    port = free_port()
    spec = WorkerSpec(
        client_id="cold", worker_id=worker_id, agent_name=f"cold--{worker_id}", status_port=port, credentials_fp="",
        env={
            "LIVEKIT_URL": project.url, "LIVEKIT_API_KEY": project.key, "LIVEKIT_API_SECRET": project.secret,
            **WorkerConfig(worker_id, "cold", f"cold--{worker_id}", port, []).to_env(),
        },
    )
    arrived = arrivals.watch(room)
    t0 = time.perf_counter()
    handle = backend.start(spec)
    address = StatusAddress("127.0.0.1", port)
    wait_until(lambda: (read_status(address) or {}).get("registered"), 60, "the cold worker to register", interval=0.01)
    # The worker takes only the job of the lease it was claimed for (runtime/livekit/handoff.py).
    lease_id = uuid.uuid4().hex
    url = f"http://127.0.0.1:{port}/claim?lease_id={lease_id}&worker_id={worker_id}"
    urllib.request.urlopen(urllib.request.Request(url, method="POST"))
    project.call(
        lambda lk: lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=spec.agent_name, room=room, metadata=json.dumps({"lease_id": lease_id}))
        )
    )
    elapsed = arrived.result(timeout=70) - t0
    project.delete_room(room)
    backend.wait(handle)
    return elapsed


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--chart", type=Path, default=None, help="write a PNG chart here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    project = LiveKitProject(LiveKitServer({"benchkey": "bench-" + uuid.uuid4().hex}), "benchkey", "")
    project.secret = project.server.keys["benchkey"]
    project.server.start()
    client = Client("bench", project, min_idle=1, max_size=2)
    env = write_config(work / "clients.yaml", [client])
    serve = Serve(work / "clients.yaml", env, work / "serve.log").start()
    backend = ProcessBackend(log_dir=work / "cold-workers", zygote=False)  # cold: a fresh interpreter
    arrivals = ArrivalWatch(project)
    answered: list[float] = []
    warm: list[float] = []
    cold: list[float] = []
    try:
        for i in range(args.sessions):
            a, w = warm_session(serve, client, project, arrivals)
            answered.append(a)
            warm.append(w)
            cold.append(cold_session(backend, project, arrivals))
            print(f"session {i + 1:2d}: warm 200 {a * 1000:7.1f} ms, in room {w * 1000:7.1f} ms   "
                  f"cold {cold[-1] * 1000:7.1f} ms", flush=True)
    finally:
        arrivals.close()
        serve.stop()
        project.server.stop()
    print()
    print(f"machine: {machine()}")
    print(f"sessions: {args.sessions} warm, {args.sessions} cold, alternating")
    print("| start | p50 (ms) | p95 (ms) | min (ms) | max (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    series = (("warm pool: trigger to 200", answered), ("warm pool: agent in room", warm), ("cold start: agent in room", cold))
    for name, values in series:
        ms = [v * 1000 for v in values]
        print(f"| {name} | {pct(ms, 50):.0f} | {pct(ms, 95):.0f} | {min(ms):.0f} | {max(ms):.0f} |")
    print(f"cold / warm at p50: {pct(cold, 50) / pct(warm, 50):.1f}x; at p95: {pct(cold, 95) / pct(warm, 95):.1f}x")
    if args.chart:
        chart(series, args.chart)


def chart(series: tuple[tuple[str, list[float]], ...], path: Path) -> None:
    """p50 and p95 of each series as grouped bars, in ms."""
    from bench.charts import Panel, grouped_bars

    grouped_bars(path, "Trigger latency: warm pool against cold start, one run", [name for name, _ in series],
                 Panel("ms", {f"p{q}": [pct([v * 1000 for v in vals], q) for _, vals in series] for q in (50, 95)}))


if __name__ == "__main__":
    main()
