"""The benchmark's PNG chart: latency (p50 dashed, p99 solid) and CPU per delivery against
deliveries per second, each design and subscriber count a line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen needed

import matplotlib.pyplot as plt  # after choosing the backend

from bench.fanout import medians

STYLE = {
    "gateway": "tab:blue",
    "gateway-window": "tab:green",
    "gateway-1write": "tab:cyan",
    "guide": "tab:red",
}


def chart(result: dict[str, Any], path: Path) -> None:
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(12, 4.8))
    # One line per design and scenario, but for the scenarios with stalled clients (one rate,
    # with and without them: their tables say it).
    rows = medians(result["rows"])
    stalling = {row["scenario"] for row in rows if row["stalled"]}
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["scenario"] not in stalling:
            series.setdefault((row["design"], row["scenario"]), []).append(row)
    for (design, scenario), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["deliveries_per_second"])
        x = [r["deliveries_per_second"] for r in rows]
        marker = "o" if rows[0]["subscribers"] <= 1000 else "s"
        label = f"{design}, {scenario} ({rows[0]['subscribers']} subscribers)"
        color = STYLE.get(design, "tab:gray")
        latency.plot(x, [r["latency_p99_ms"] or 0 for r in rows], marker=marker, color=color,
                     label=label)  # fmt: skip
        latency.plot(x, [r["latency_p50_ms"] or 0 for r in rows], marker=marker, color=color,
                     linestyle="--", alpha=0.6)  # fmt: skip
        cpu.plot(x, [r["cpu_us_per_delivery"] or 0 for r in rows], marker=marker, color=color,
                 label=label)  # fmt: skip
    latency.axhline(250, color="gray", linestyle="--", linewidth=1)
    for axes, title, unit in (
        (latency, "delivery latency: p99 (solid), p50 (dashed)", "ms"),
        (cpu, "gateway CPU per delivery", "µs"),
    ):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("deliveries per second (one core)")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
    cpu.legend(fontsize=8)
    figure.suptitle(f"fan-out, {result['when']}, {result['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
