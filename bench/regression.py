"""The claims of docs/performance.md the suite guards, measured the way its tests check them.

``python -m bench.regression`` runs the benchmark's own scenarios for them and prints the
results as JSON:

- CPU: 1k subscribers at 20 msg/s for 6 s, this gateway and the guide's design, three
  alternating pairs, the median pair's ratio of CPU per delivery; ``tests/test_bench.py``
  fails when it is above ``bench.targets.CPU_VS_GUIDE``. A ratio, not a time, so a slower or
  faster machine does not move it much; the median of three pairs, because a single pair on
  a shared 2-core VM varies by a fifth.
- Latency: 1k subscribers at 200 msg/s for 6 s, this gateway and itself writing every
  delivery on its own (``GATEWAY_COALESCE=off``), three alternating pairs: the median run's
  p50 and p99 and share delivered against bounds twice issue 17's targets (``LATENCY_200``,
  generous, since latency is a time and moves with the machine: it fails a replica that
  holds messages far longer than it needs), and the median pair's CPU per delivery against
  writing through (``CPU_VS_1WRITE``, a ratio, which moves less: it fails a replica that does
  not hold them when its core is saturated).
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
#: CPU per delivery at 200 msg/s over writing every delivery on its own: at most (measured
#: 0.60 on a Xeon VM, 0.38 on an AMD EPYC VM whose writes cost more).
CPU_VS_1WRITE = 0.75


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
    """The gateway at 200 msg/s to 1k subscribers, beside itself writing every delivery on
    its own, alternately, ``pairs`` times: the run of median p50, and the median CPU ratio."""
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_server = bench_redis(Path(workdir))
        try:
            for _ in range(pairs):
                adaptive, through = (
                    run(design, redis_server, SUBSCRIBERS, 200.0, SECONDS, 0)
                    for design in ("gateway", "gateway-1write")
                )
                runs.append((adaptive, through))
        finally:
            redis_server.stop()
    ratios = sorted(a["cpu_us_per_delivery"] / t["cpu_us_per_delivery"] for a, t in runs)
    adaptive = sorted((a for a, _ in runs), key=lambda row: row["latency_p50_ms"])[pairs // 2]
    return {
        "p50_ms": adaptive["latency_p50_ms"],
        "p99_ms": adaptive["latency_p99_ms"],
        "delivered_share": adaptive["delivered_share"],
        "cpu_us_per_delivery": adaptive["cpu_us_per_delivery"],
        "cpu_vs_1write": ratios[pairs // 2],
        "pair_ratios": ratios,
    }


def main() -> None:
    print(json.dumps({"cpu": measure_ratio(), "latency_200": measure_latency()}))


if __name__ == "__main__":
    main()
