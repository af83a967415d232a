"""RAG cost against corpus size: indexing time and retrieval time per turn (bm25s).

    .venv/bin/python bench/rag_scaling.py [--sizes 1000 10000 100000] [--queries 200]

The corpus is synthetic and reproducible (seeded): passages of 40 words drawn from a
5,000-word vocabulary with a Zipf-like skew, as prose is. Queries are 6 to 10 words drawn
the same way. Indexing is what a worker does once at start, before it reports idle;
retrieval is what every user turn pays.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.rag import KnowledgeBase
from bench.trigger_latency import machine


def vocabulary(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(7)
    words = vocabulary(5000, rng)
    weights = [1 / (i + 1) for i in range(len(words))]
    print(f"machine: {machine()}")
    print("| passages | index (s) | retrieval p50 (ms) | retrieval p95 (ms) |")
    print("| ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        passages = [" ".join(rng.choices(words, weights, k=40)) for _ in range(size)]
        started = time.perf_counter()
        kb = KnowledgeBase(passages)
        index_s = time.perf_counter() - started
        timings = []
        for _ in range(args.queries):
            query = " ".join(rng.choices(words, weights, k=rng.randint(6, 10)))
            t0 = time.perf_counter()
            kb.search(query, k=3)
            timings.append((time.perf_counter() - t0) * 1000)
        p95 = statistics.quantiles(timings, n=100)[94]
        print(f"| {size} | {index_s:.2f} | {statistics.median(timings):.2f} | {p95:.2f} |", flush=True)


if __name__ == "__main__":
    main()
