"""A chart beside every comparative table in docs/benchmarks.md that has none of its own.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/doc_charts.py [--doc docs/benchmarks.md]

The benchmark scripts draw the chart of the run they make (``--chart``). Tables recorded
before the scripts could draw get theirs here, drawn from the table's own numbers, so a
chart never shows figures that its table does not. The script writes
``docs/charts/<table>.png`` and puts a link to it under the table, once; run it again after
editing such a table.

A table gets a chart when it has numeric columns whose unit is in the header: "(ms)",
"(s)", "(MB)", "(GB)", or a header that is the unit itself. Each unit becomes one panel.
Cells that are not numbers ("n/a", "not run") are left out of the chart. The label of a row
is its text columns. Tables whose units vary by row (one figure a row) are skipped and
listed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.charts import Panel, grouped_bars

UNITS = ("ms", "s", "MB", "GB")
_UNIT = re.compile(r"\((ms|s|MB|GB)\)")
_NUMBER = re.compile(r"^~?(\d+(?:\.\d+)?)")
_STATS = {"p50", "p95", "min", "max", "median"}
_CHART_LINK = re.compile(r"^!\[.*\]\(.*\.png\)$")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> float | None:
    match = _NUMBER.match(cell.replace("*", "").replace("`", "").strip())
    return float(match.group(1)) if match else None


def tables(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of every markdown table."""
    found, start = [], None
    for i, line in enumerate([*lines, ""]):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            found.append((start, i - 1))
            start = None
    return found


def has_chart(lines: list[str], last: int) -> bool:
    """A chart link within the few lines under the table (a blank line, maybe a note)."""
    return any(_CHART_LINK.match(line.strip()) for line in lines[last + 1:last + 4])


def panels(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[Panel]]:
    """Row labels, and one panel per unit with a series per numeric column of that unit."""
    unit_of = {}
    for col, name in enumerate(header[1:], start=1):
        found = _UNIT.search(name)
        unit = found.group(1) if found else (name if name in UNITS else None)
        values = [number(r[col]) for r in rows if col < len(r)]
        if unit and any(v is not None for v in values):
            unit_of[col] = unit
    label_cols = [c for c in range(len(header)) if c not in unit_of and all(number(r[c]) is None or c == 0 for r in rows)]
    labels = [" · ".join(r[c].replace("`", "").replace("*", "") for c in label_cols if r[c]) for r in rows]
    names, measure = {}, ""
    for c in unit_of:  # "max" after "insert to ready p50" is that measure's max
        name = re.sub(r"\s*\((ms|s|MB|GB)\)", "", header[c]).strip()
        words = name.split()
        if words and words[-1] in _STATS and len(words) > 1:
            measure = " ".join(words[:-1])
        names[c] = f"{measure} {name}".strip() if name in _STATS else (name or unit_of[c])
    result = []
    for unit in dict.fromkeys(unit_of.values()):
        series = {names[c]: [number(r[c]) for r in rows] for c, u in unit_of.items() if u == unit}
        result.append(Panel(unit, series, "{:.3g}"))
    return labels, result


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    lines = args.doc.read_text().splitlines()
    inserts: list[tuple[int, str]] = []
    section = ""
    for first, last in tables(lines):
        section = next((line[3:] for line in reversed(lines[:first]) if line.startswith("## ")), section)
        header, rows = cells(lines[first]), [cells(row) for row in lines[first + 2:last + 1]]
        if has_chart(lines, last):
            continue
        labels, chart_panels = panels(header, rows)
        if not chart_panels:
            print(f"skipped (no unit in its header): line {first + 1}, {header[:3]}")
            continue
        name = f"{slug(section)}-{first + 1}.png"
        path = args.doc.parent / "charts" / name
        path.parent.mkdir(exist_ok=True)
        grouped_bars(path, f"{section} (from the table's numbers)", labels, *chart_panels)
        inserts.append((last + 1, f"\n![{section}: chart of the table above](charts/{name})"))
    for at, text in reversed(inserts):
        lines.insert(at, text)
    args.doc.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
