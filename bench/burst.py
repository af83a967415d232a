"""A burst of simultaneous triggers on a small warm pool: zygote fork against plain start, one run.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/burst.py [--triggers 20] [--rounds 3] [--chart docs/burst.png]

One client with ``min_idle: 2, max_size: 20`` on a real livekit-server on loopback. Three
kinds, rotating which goes first each round: the zygote and a plain start, both with the
shipped ``runtime.dispatch.max_wait_s``, and a plain start allowed to wait 60 s (how long
plain starts take to absorb the burst). Each round starts ``autonomite serve``, waits until
it is ready, lets it settle, then sends all triggers at once. Two idle workers take the
first two; the others wait in the pool's queue for the workers it starts for them. For
every 200 the bench polls LiveKit (every 100 ms per room, one kept-alive connection: light,
as it shares the 2 cores) until the leased worker's agent is ACTIVE in its room. Reported:
how many triggers got an agent, the time to the last 200, and the time from the burst
until the last agent was in its room.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from livekit import api

from bench.trigger_latency import machine
from runtime.dev.devserver import LiveKitServer
from runtime.settings import DispatchSettings
from tests.load import agent_in_room, lk_api, trigger
from tests.support import Client, LiveKitProject, Serve, wait_until, write_config


async def burst(serve: Serve, client: Client, n: int) -> tuple[int, float, float]:
    """(agents in their rooms, seconds to the last 200, seconds to the last agent in its room)."""
    tag = uuid.uuid4().hex[:6]
    async with aiohttp.ClientSession() as http, lk_api(client) as lk:
        t0 = time.perf_counter()

        async def one(i: int) -> tuple[float, float] | None:
            o = await trigger(http, serve, client, f"burst-{tag}-{i}")
            answered = time.perf_counter() - t0
            if o.status != 200 or not await agent_in_room(lk, o.room, o.body["worker_id"], 60, interval=0.1):
                return None
            return answered, time.perf_counter() - t0

        done = [r for r in await asyncio.gather(*(one(i) for i in range(n))) if r]
        for room in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms:  # a refused trigger made none
            if room.name.startswith(f"burst-{tag}-"):
                await lk.room.delete_room(api.DeleteRoomRequest(room=room.name))
    return len(done), max((a for a, _ in done), default=0.0), max((b for _, b in done), default=0.0)


# What is compared: the zygote and a plain start, both with the shipped wait, and a plain
# start given all the time it needs (how long 20 plain starts take to absorb the burst).
KINDS = {
    "zygote fork": (True, DispatchSettings().max_wait_s),
    "plain start": (False, DispatchSettings().max_wait_s),
    "plain start, max_wait_s 60": (False, 60.0),
}


def run_round(work: Path, project: LiveKitProject, kind: str, n: int) -> tuple[int, float, float]:
    zygote, max_wait_s = KINDS[kind]
    client = Client("burst", project, min_idle=2, max_size=n)
    folder = work / f"{'zygote' if zygote else 'plain'}-{uuid.uuid4().hex[:4]}"
    folder.mkdir()
    env = write_config(folder / "clients.yaml", [client], workers={"zygote": zygote},
                       dispatch={"max_wait_s": max_wait_s})
    serve = Serve(folder / "clients.yaml", env, folder / "serve.log").start()
    try:
        wait_until(lambda: (p := serve.pool("burst")) and p["idle"] == 2 and p["starting"] == 0, 120, "the pool at rest")
        time.sleep(3)  # let the start-up's CPU settle: the burst meets a quiet, warm pool
        return asyncio.run(burst(serve, client, n))
    finally:
        serve.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--triggers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    project = LiveKitProject(LiveKitServer({"benchkey": "bench-" + uuid.uuid4().hex}), "benchkey", "")
    project.secret = project.server.keys["benchkey"]
    project.server.start()
    results: dict[str, list[tuple[int, float, float]]] = {kind: [] for kind in KINDS}
    try:
        for i in range(args.rounds):
            for kind in list(KINDS)[i % len(KINDS):] + list(KINDS)[: i % len(KINDS)]:
                results[kind].append(run_round(work, project, kind, args.triggers))
                ok, last_200, last_agent = results[kind][-1]
                print(f"round {i + 1} {kind}: {ok}/{args.triggers} agents in their rooms, last 200 at {last_200:.2f} s, "
                      f"last agent in room at {last_agent:.2f} s", flush=True)
    finally:
        project.server.stop()
    print()
    print(f"machine: {machine()}")
    print(f"{args.triggers} simultaneous triggers, pool min_idle 2, max_size {args.triggers}, "
          f"shipped max_wait_s {DispatchSettings().max_wait_s}, {args.rounds} rounds each, rotating")
    print("| start | agents in room (median of rounds) | worst round | last 200 p50 (s) | last agent in room p50 (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, rounds in results.items():
        print(f"| {kind} | {statistics.median(r[0] for r in rounds):.0f} of {args.triggers} | "
              f"{min(r[0] for r in rounds)} | {statistics.median(r[1] for r in rounds):.2f} | "
              f"{statistics.median(r[2] for r in rounds):.2f} |")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        kinds = list(results)
        grouped_bars(args.chart, f"{args.triggers} simultaneous triggers on min_idle 2 (median of {args.rounds} rounds)",
                     kinds,
                     Panel("agents in their rooms", {"sessions": [statistics.median(r[0] for r in results[k]) for k in kinds]}),
                     Panel("seconds from the burst (p50 of rounds)", {
                         "last 200": [statistics.median(r[1] for r in results[k]) for k in kinds],
                         "last agent in room": [statistics.median(r[2] for r in results[k]) for k in kinds],
                     }, "{:.2f}"))


if __name__ == "__main__":
    main()
