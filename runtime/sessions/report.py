"""Usage as ``autonomite usage`` prints it: a table for people, CSV for a billing system.

Pure: it formats what ``SqliteStore.usage`` returns. One row per client; the session
counts by end cause get a column each, in the vocabulary's order, so a CSV's columns stay
the same from one month to the next whatever happened in it.
"""

from __future__ import annotations

import csv
import io
from typing import Any, get_args

from agent.contract import EndCause

OUTCOMES = [*get_args(EndCause), "unknown", "open", "pending", "refused"]
COLUMNS = ["client", "sessions", *OUTCOMES, "session_seconds", "idle_worker_seconds"]


def rows(usage: dict[str, dict[str, Any]]) -> list[list[Any]]:
    out = []
    for client in sorted(usage):
        u = usage[client]
        counts = [u["sessions"].get(o, 0) for o in OUTCOMES]
        out.append([client, sum(counts), *counts, round(u["session_seconds"], 3), round(u["idle_worker_seconds"], 3)])
    return out


def as_csv(usage: dict[str, dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows(usage))
    return buffer.getvalue()


def as_table(usage: dict[str, dict[str, Any]]) -> str:
    """Only the columns with something in them: a month of one outcome reads as that."""
    table = [COLUMNS, *[[str(v) for v in r] for r in rows(usage)]]
    keep = [i for i in range(len(COLUMNS)) if i < 2 or i >= len(COLUMNS) - 2 or any(r[i] != "0" for r in table[1:])]
    table = [[r[i] for i in keep] for r in table]
    widths = [max(len(r[i]) for r in table) for i in range(len(keep))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
                     for r in table) + "\n"
