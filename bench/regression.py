"""CPU per delivery against the guide's design, for the regression test.

``python -m bench.regression --record`` measures the ratio (this gateway's CPU per delivery over
the guide's, in the same run, on a small fixed scenario) and writes it to
``bench/results/regression.json``; ``tests/test_bench.py`` measures it again and fails when it
is more than 40% worse than the recorded figure. A ratio, not a time, so a slower or faster
machine does not move it much; the median of three alternating pairs, because a single pair
on a shared 2-core VM varies by a third (0.44 to 0.66 for the same code, measured).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.fanout import bench_redis, run

RECORD = Path(__file__).parent / "results" / "regression.json"
SUBSCRIBERS, RATE, SECONDS, PAIRS = 500, 40.0, 4.0, 3
#: How much worse than the recorded ratio the test tolerates.
TOLERANCE = 1.4


def measure_ratio() -> dict[str, float]:
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
    gateway, guide = sorted(pairs, key=lambda pair: pair[0] / pair[1])[len(pairs) // 2]
    return {
        "gateway_cpu_us_per_delivery": gateway,
        "guide_cpu_us_per_delivery": guide,
        "ratio": gateway / guide,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", action="store_true", help=f"write {RECORD}")
    args = parser.parse_args()
    measured = measure_ratio()
    print(json.dumps(measured))
    if args.record:
        RECORD.write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    main()
