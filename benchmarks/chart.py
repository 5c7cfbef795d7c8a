"""Draw the benchmark bar chart from the raw runs saved by ``benchmarks/run.py``.

    python benchmarks/chart.py RESULTS.json|- OUTPUT.png

Runs in the ``report`` virtualenv (matplotlib), so the project itself does not depend on matplotlib.
Bars are medians; the whiskers span min-max over the rounds; our library is drawn in its own colour.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import OURS, aggregate

PANELS = [
    ("drain", "tasks_per_s", "Redis drain, tasks/s (higher is better)", False),
    ("enqueue", "single_per_s", "Redis single enqueue, tasks/s (higher is better)", False),
    ("enqueue", "bulk_per_s", "Redis bulk enqueue, tasks/s (higher is better)", False),
    ("latency", "p50_ms", "Redis enqueue → start p50, ms (lower is better)", True),
    ("mix", "tasks_per_s", "Redis 10 ms sleep mix, tasks/s (higher is better)", False),
    ("sqlite_drain", "tasks_per_s", "SQLite drain, tasks/s (higher is better)", False),
]


def draw(result: dict[str, object], output: str) -> None:
    """Write the chart for ``result`` to ``output``."""
    table, _ = aggregate(result["runs"])  # type: ignore[arg-type]
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for axis, (scenario, metric, title, lower_better) in zip(axes.flat, PANELS, strict=True):
        stats = {lib: m[metric] for lib, m in table.get(scenario, {}).items() if metric in m}
        libs = sorted(stats, key=lambda lib: stats[lib].median, reverse=not lower_better)
        medians = [stats[lib].median for lib in libs]
        errors = [
            [stats[lib].median - stats[lib].low for lib in libs],
            [stats[lib].high - stats[lib].median for lib in libs],
        ]
        colours = ["#d62728" if lib == OURS else "#7f7f7f" for lib in libs]
        axis.bar(libs, medians, yerr=errors, color=colours, capsize=3)
        for x, value in enumerate(medians):
            axis.annotate(
                f"{value:,.0f}" if value >= 10 else f"{value:.2f}",
                (x, value),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=35, labelsize=8)
        if not libs:
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
    meta = result["meta"]  # type: ignore[index]
    figure.suptitle(
        f"lifecycle vs peers — {meta['machine']}, one worker process, medians (min-max)",  # type: ignore[index]
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(output, dpi=90)


if __name__ == "__main__":
    source, target = sys.argv[1], sys.argv[2]
    data = json.load(sys.stdin) if source == "-" else json.loads(Path(source).read_text())
    draw(data, target)
