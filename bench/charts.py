"""One chart shape for every comparative table in docs/benchmarks.md: grouped horizontal bars.

Needs matplotlib (``.venv/bin/pip install -e '.[bench]'``); imported only when a chart is asked for.
A figure has one panel per unit (seconds beside megabytes, never on one axis).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")


class Panel(NamedTuple):
    unit: str  # the x axis label
    series: dict[str, list[float | None]]  # one bar per series in each row's group; None: no figure
    fmt: str = "{:.0f}"


def grouped_bars(path: Path, title: str, rows: list[str], *panels: Panel) -> None:
    """One group of bars per row (a table's line), one bar per series (a table's column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars_per_row = max(len(p.series) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.5, 1.2 + 0.42 * len(rows) * bars_per_row),
                             dpi=120, sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        height = 0.8 / len(panel.series)
        for k, (name, values) in enumerate(panel.series.items()):
            bars = ax.barh([i + k * height for i in range(len(rows))], [v or 0.0 for v in values],
                           height=height * 0.95, color=COLORS[k % len(COLORS)], label=name)
            ax.bar_label(bars, labels=["n/a" if v is None else panel.fmt.format(v) for v in values], padding=3,
                         fontsize=8)
        ax.set_yticks([i + height * (len(panel.series) - 1) / 2 for i in range(len(rows))], rows)
        ax.set_xlim(0, max((v for vs in panel.series.values() for v in vs if v is not None), default=1) * 1.22 or 1)
        ax.set_xlabel(panel.unit)
        if len(panel.series) > 1:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"chart: {path}")
