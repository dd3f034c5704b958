"""The claims of docs/performance.md the suite guards, measured the way its tests check them.

``python -m bench.regression`` runs the benchmark's own scenarios for them and prints the
results as JSON:

- CPU: 1k subscribers at 20 msg/s for 6 s, this gateway and the guide's design, three
  alternating pairs, the median pair's ratio of CPU per delivery; ``tests/test_bench.py``
  fails when it is above ``bench.targets.CPU_VS_GUIDE``. A ratio, not a time, so a slower or
  faster machine does not move it much; the median of three pairs, because a single pair on
  a shared 2-core VM varies by a fifth.
- Latency: 1k subscribers at 200 msg/s for 6 s, this gateway and itself with the fixed 20 ms
  window of before (``GATEWAY_COALESCE=window``), three alternating pairs: the median pair's
  p50 and p99 and share delivered against bounds twice issue 17's targets (``LATENCY_200``,
  generous, since latency is a time and moves with the machine), and its p50 against the
  fixed window's (``P50_VS_WINDOW``, a ratio, which does not).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench.fanout import bench_redis, run

SUBSCRIBERS, RATE, SECONDS, PAIRS = 1000, 20.0, 6.0, 3
#: Issue 17's latency targets at 200 msg/s doubled, milliseconds: p50, p99.
LATENCY_200 = (20.0, 60.0)
#: The p50 at 200 msg/s over the fixed window's: at most (measured 0.45 to 0.65).
P50_VS_WINDOW = 0.8


def measure_ratio() -> dict[str, Any]:
    pairs: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_server = bench_redis(Path(workdir))
        try:
            for _ in range(PAIRS):
                gateway, guide = (
                    run(design, redis_server, SUBSCRIBERS, RATE, SECONDS, 0)["cpu_us_per_delivery"]
                    for design in ("gateway", "guide")
                )
                pairs.append((gateway, guide))
        finally:
            redis_server.stop()
    ratios = sorted(gateway / guide for gateway, guide in pairs)
    gateway, guide = sorted(pairs, key=lambda pair: pair[0] / pair[1])[len(pairs) // 2]
    return {
        "gateway_cpu_us_per_delivery": gateway,
        "guide_cpu_us_per_delivery": guide,
        "ratio": gateway / guide,
        "pair_ratios": ratios,
    }


def measure_latency(pairs: int = PAIRS) -> dict[str, Any]:
    """The gateway at 200 msg/s to 1k subscribers, beside itself with the fixed window of
    before, alternately: the pair of median p50 ratio, of ``pairs``."""
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_server = bench_redis(Path(workdir))
        try:
            for _ in range(pairs):
                adaptive, window = (
                    run(design, redis_server, SUBSCRIBERS, 200.0, SECONDS, 0)
                    for design in ("gateway", "gateway-window")
                )
                runs.append((adaptive, window))
        finally:
            redis_server.stop()
    runs.sort(key=lambda pair: pair[0]["latency_p50_ms"] / pair[1]["latency_p50_ms"])
    adaptive, window = runs[len(runs) // 2]
    return {
        "p50_ms": adaptive["latency_p50_ms"],
        "p99_ms": adaptive["latency_p99_ms"],
        "delivered_share": adaptive["delivered_share"],
        "cpu_us_per_delivery": adaptive["cpu_us_per_delivery"],
        "window_p50_ms": window["latency_p50_ms"],
        "p50_vs_window": adaptive["latency_p50_ms"] / window["latency_p50_ms"],
    }


def main() -> None:
    print(json.dumps({"cpu": measure_ratio(), "latency_200": measure_latency()}))


if __name__ == "__main__":
    main()
