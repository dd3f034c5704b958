"""The CPU claim of docs/performance.md, measured the way its test checks it.

``python -m bench.regression`` runs the benchmark's own scenario for that claim (1k subscribers,
20 msg/s, 6 s) for this gateway and the guide's design, three alternating pairs, and prints
the median pair's ratio of CPU per delivery; ``tests/test_bench.py`` fails when it is above
``bench.targets.CPU_VS_GUIDE``, the documented bound. A ratio, not a time, so a slower or
faster machine does not move it much; the median of three pairs, because a single pair on a
shared 2-core VM varies by a fifth.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench.fanout import bench_redis, run

SUBSCRIBERS, RATE, SECONDS, PAIRS = 1000, 20.0, 6.0, 3


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


def main() -> None:
    print(json.dumps(measure_ratio()))


if __name__ == "__main__":
    main()
