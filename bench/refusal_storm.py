"""The front door under a retry storm: how fast the runtime says no, against a bare aiohttp app.

    .venv/bin/python bench/refusal_storm.py [--requests 3000] [--concurrency 20] [--chart docs/refusal_storm.png]

One client with ``max_size: 1`` whose one worker is in a session, and ``max_wait_s: 0``:
every further trigger goes gateway -> dispatcher -> pool and comes back a 503
``no_idle_worker``, with every check a real trigger meets (token, body limits and timeout,
JSON depth, Unicode, the model). Beside it, in the same run and with the same client load,
a bare aiohttp handler that answers the same 503 body at once: the floor of this machine
and this HTTP stack. Reported as requests a second and p50/p99 latency, and as the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trigger_latency import machine
from runtime.backends.ports import free_port
from tests.support import Client, Serve, start_livekit, write_config

BODY = {"error": "no_idle_worker", "detail": "all warm workers are busy and the pool is at max_size, "
        "or none became ready within max_wait_s"}


async def storm(url: str, token: str, payload: bytes, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    left = iter(range(requests))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in left:
            t0 = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"rps": requests / elapsed, "p50": latencies[len(latencies) // 2],
            "p99": latencies[int(len(latencies) * 0.99)], "statuses": statuses}


async def bare(port: int) -> web.AppRunner:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(BODY, status=503, headers={"Retry-After": "1"})

    app = web.Application()
    app.router.add_post("/api/v1/trigger", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-storm-"))
    project = start_livekit(work, "storm")
    busy = Client("busy", project, min_idle=1, max_size=1)
    env = write_config(work / "clients.yaml", [busy], dispatch={"max_wait_s": 0})
    serve = Serve(work / "clients.yaml", env, work / "serve.log").start()
    try:
        assert serve.start_session(busy, "the-one-session").status == 200  # its only worker is now busy
        payload = json.dumps({"client_id": "busy", "agent": "support", "room_name": "another"}).encode()
        first = asyncio.run(storm(f"http://127.0.0.1:{serve.port}/api/v1/trigger", busy.token, payload, 50, 5))
        assert first["statuses"] == {503: 50}, first

        async def both() -> tuple[dict, dict]:
            port = free_port()
            runner = await bare(port)
            try:
                floor = await storm(f"http://127.0.0.1:{port}/api/v1/trigger", busy.token, payload,
                                    args.requests, args.concurrency)
            finally:
                await runner.cleanup()
            ours = await storm(f"http://127.0.0.1:{serve.port}/api/v1/trigger", busy.token, payload,
                               args.requests, args.concurrency)
            return floor, ours

        floor, ours = asyncio.run(both())
    finally:
        serve.stop()
        project.server.stop()
    print(f"machine: {machine()}")
    print(f"| {args.requests:,} triggers refused 503, {args.concurrency} at a time | requests/s | p50 (ms) | p99 (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in (("bare aiohttp handler", floor), ("gateway -> dispatcher -> pool", ours)):
        print(f"| {name} | {r['rps']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} |")
    print(f"throughput, runtime / bare: {ours['rps'] / floor['rps']:.2f}x; p99 {ours['p99'] / floor['p99']:.1f}x")
    assert ours["statuses"] == {503: args.requests}, ours["statuses"]
    if args.chart:
        from bench.charts import Panel, grouped_bars

        grouped_bars(args.chart, f"A retry storm: {args.requests:,} refusals, {args.concurrency} at a time",
                     ["bare aiohttp", "the runtime"],
                     Panel("requests / s", {"req/s": [floor["rps"], ours["rps"]]}),
                     Panel("latency (ms)", {"p50": [floor["p50"], ours["p50"]], "p99": [floor["p99"], ours["p99"]]},
                           "{:.1f}"))


if __name__ == "__main__":
    main()
