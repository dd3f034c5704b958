"""The whole benchmark in one command: ``python -m bench [--quick]``.

Runs every scenario of docs/performance.md for this gateway and the guide's design in the same
run (server pinned to CPU 0, load clients, Redis and the publisher on CPU 1), then writes
``bench/results/report.json``, ``bench/results/report.md`` (tables and the targets as ratios)
and ``bench/results/fanout.png`` (latency and CPU against throughput). ``--quick`` runs the
same scenarios small and short, to check that the benchmark works, not to measure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.chart import chart
from bench.fanout import Scenario, bench_redis, medians, report, sweep, table
from bench.targets import targets

BOTH = ("gateway", "guide")
#: This gateway as it is, as it was before adaptive coalescing (fixed window), writing every
#: delivery on its own, and the guide's design.
ALL = ("gateway", "gateway-window", "gateway-1write", "guide")
FULL = (
    Scenario("1k", 1000, ALL, (20, 50, 100, 200), repeats=3),
    Scenario("1k-saturation", 1000, BOTH, (50, 100, 500, 1000, 2000), until_saturated=True),
    Scenario("10k", 10000, BOTH, (2, 5, 20, 50, 100, 200), until_saturated=True),
    Scenario("1k-stalled", 1000, BOTH, (20,), stalled_percent=5, pairs=3),
    Scenario("1k-4KiB-stalled", 1000, BOTH, (50,), stalled_percent=5, payload=4096),
)
QUICK = (
    Scenario("1k", 40, ALL, (20, 50, 100, 200), settle=0.3),
    Scenario("1k-saturation", 40, BOTH, (500,), until_saturated=True, settle=0.3),
    Scenario("10k", 60, BOTH, (20,), until_saturated=True, settle=0.3),
    Scenario("1k-stalled", 40, BOTH, (20,), stalled_percent=5, settle=0.3),
    Scenario("1k-4KiB-stalled", 40, BOTH, (50,), stalled_percent=5, settle=0.3, payload=4096),
)


def measure(scenarios: tuple[Scenario, ...], seconds: float, workdir: Path) -> list[dict[str, Any]]:
    redis_server = bench_redis(workdir)
    try:
        return [row for scenario in scenarios for row in sweep(scenario, redis_server, seconds)]
    finally:
        redis_server.stop()


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Measured {result['when']} on {result['machine']}.", "", "## Targets", ""]
    lines += ["| issue | target | measured | bound | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(
            f"| {t['issue']} | {t['target']} | {t['measured']} | {t['bound']} | {t['met']} |"
        )
    rows = medians(result["rows"])
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        these = [r for r in rows if r["scenario"] == scenario]
        lines += ["", f"## Scenario {scenario}", ""]
        if these[0]["runs"] > 1:
            lines += [f"Medians of {these[0]['runs']} runs each (every run: report.json).", ""]
        lines.append(table(these))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    scenarios = QUICK if args.quick else FULL
    seconds = args.seconds or (1.0 if args.quick else 6.0)
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure(scenarios, seconds, Path(workdir))
    result = {**report(rows), "seconds": seconds, "targets": targets(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(result))
    chart(result, args.out / "fanout.png")
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
