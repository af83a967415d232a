"""A rolling restart on one address under load: how many requests does the handover lose?

    .venv/bin/python bench/rolling_restart.py [--rounds 5] [--clients 8] [--chart docs/rolling_restart.png]

Each round starts a new ``autonomite serve --replace`` on the running one's address (same
config, SO_REUSEPORT). The new one warms up, listens beside the old one, and sends it
SIGTERM; the old one stops listening and drains (nothing is in session here, so it exits
at once). Meanwhile ``--clients`` threads send ``GET /healthz`` back to back, each on a new
connection (what a caller without keep-alive does; both runtimes answer it), and every
failure is counted by kind. The window of interest is the old runtime closing its
listener: a connection the kernel queued on it and it had not accepted yet is reset,
unless ``net.ipv4.tcp_migrate_req=1`` hands it to the new listener. The script reports
that sysctl's value alongside. A real livekit-server runs on loopback; nothing leaves the
machine.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trigger_latency import machine
from tests.support import Client, Serve, start_livekit, wait_until, write_config


def hammer(port: int, stop: threading.Event, counts: collections.Counter, lock: threading.Lock) -> None:
    while not stop.is_set():
        kind = "ok"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            if status != 200:
                kind = f"http {status}"
        except OSError as e:
            kind = type(e).__name__
        except http.client.HTTPException as e:
            kind = type(e).__name__
        with lock:
            counts[kind] += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows: list[tuple[int, int, float]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-rolling-"))
    project = start_livekit(work, "bench")
    serves: list[Serve] = []
    try:
        alpha = Client("alpha", project, min_idle=1, max_size=2)
        env = write_config(work / "clients.yaml", [alpha])
        old = Serve(work / "clients.yaml", env, work / "serve-0.log").start()
        serves.append(old)
        migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
        print(f"net.ipv4.tcp_migrate_req={migrate}; {args.clients} clients, GET /healthz on new connections")
        print("round  requests  failed  kinds                            handover (new listens -> old exited)")
        for n in range(1, args.rounds + 1):
            counts: collections.Counter = collections.Counter()
            lock, stop = threading.Lock(), threading.Event()
            threads = [threading.Thread(target=hammer, args=(old.port, stop, counts, lock), daemon=True)
                       for _ in range(args.clients)]
            for t in threads:
                t.start()
            new = Serve(work / "clients.yaml", env, work / f"serve-{n}.log", args=("--replace",))
            serves.append(new)
            new.start(wait_up=False)
            wait_until(lambda: "gateway listening" in new.log(), 120, "the new runtime to listen")
            listened = time.monotonic()
            old.proc.wait(60)
            handover = time.monotonic() - listened
            time.sleep(1.0)  # load on the new one alone for a moment
            stop.set()
            for t in threads:
                t.join(15)
            failed = sum(v for k, v in counts.items() if k != "ok")
            kinds = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "ok") or "-"
            print(f"{n:>5}  {sum(counts.values()):>8}  {failed:>6}  {kinds:<32} {handover:.2f} s")
            rows.append((sum(counts.values()), failed, handover))
            assert old.proc.returncode == 0, old.log()[-2000:]
            old = new
    finally:
        for s in serves:
            s.stop()
        project.server.stop()
    if args.chart and rows:
        from bench.charts import Panel, grouped_bars

        grouped_bars(args.chart, f"Rolling restart under load: {args.clients} clients, new connections, one run",
                     [f"round {n}" for n in range(1, len(rows) + 1)],
                     Panel("requests (failed beside them)", {"answered": [r - f for r, f, _ in rows],
                                                             "failed": [f for _, f, _ in rows]}),
                     Panel("handover: new listens -> old exited (s)", {"s": [h for _, _, h in rows]}, "{:.2f}"))


if __name__ == "__main__":
    main()
