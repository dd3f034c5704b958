"""The claims of docs/performance.md the suite guards, measured the way its tests check them.

``python -m bench.regression`` runs the benchmark's own scenarios for them and prints the
results as JSON:

- CPU: 1k subscribers at 20 msg/s for 6 s, this gateway and the guide's design, three
  alternating pairs, the median pair's ratio of CPU per delivery; ``tests/test_bench.py``
  fails when it is above ``bench.targets.CPU_VS_GUIDE``. A ratio, not a time, so a slower or
  faster machine does not move it much; the median of three pairs, because a single pair on
  a shared 2-core VM varies by a fifth.
- Latency: 1k subscribers at 200 msg/s for 6 s, this gateway, itself with the fixed 20 ms
  window (``GATEWAY_COALESCE=window``) and itself writing every delivery on its own
  (``GATEWAY_COALESCE=off``), three alternating rounds. Latency is a time and moves with the
  machine (the same code measured p50 31 and 12 ms in two runs an hour apart on one VM),
  so the median run's p50 and p99 are held to twice issue 17's targets (``LATENCY_200``) or
  to 1.5 and 2 times the fixed window's medians measured in the same rounds (``WINDOW_SLACK``),
  whichever is larger: it fails a replica that holds messages far longer than it needs, or
  than the policy it replaced. Share delivered must be all. The median round's CPU per
  delivery is held against writing through (``CPU_VS_1WRITE``, a ratio, which moves less):
  it fails a replica that does not hold them when its core is saturated. The CPU time the
  hypervisor took from the machine while measuring (steal) is reported beside them, to tell
  a slow VM from slow code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.fanout import TICKS, run, scratch_redis

SUBSCRIBERS, RATE, SECONDS, PAIRS = 1000, 20.0, 6.0, 3
#: Issue 17's latency targets at 200 msg/s doubled, milliseconds: p50, p99.
LATENCY_200 = (20.0, 60.0)
#: ... or this many times the fixed window's p50 and p99, measured in the same rounds, if that
#: is more: the two policies measured 0.9 to 1.0 (p50) and 1.1 to 1.45 (p99) of each other on
#: two VMs; a fixed 60 ms window measured 2.3 and 2.1.
WINDOW_SLACK = (1.5, 2.0)
#: CPU per delivery at 200 msg/s over writing every delivery on its own: at most (measured
#: 0.60 on a Xeon VM, 0.38 on an AMD EPYC VM whose writes cost more).
CPU_VS_1WRITE = 0.75


def measure_ratio() -> dict[str, Any]:
    pairs: list[tuple[float, float]] = []
    with scratch_redis() as redis_server:
        for _ in range(PAIRS):
            gateway, guide = (
                run(design, redis_server, SUBSCRIBERS, RATE, SECONDS, 0)["cpu_us_per_delivery"]
                for design in ("gateway", "guide")
            )
            pairs.append((gateway, guide))
    ratios = sorted(gateway / guide for gateway, guide in pairs)
    gateway, guide = sorted(pairs, key=lambda pair: pair[0] / pair[1])[len(pairs) // 2]
    return {
        "gateway_cpu_us_per_delivery": gateway,
        "guide_cpu_us_per_delivery": guide,
        "ratio": gateway / guide,
        "pair_ratios": ratios,
    }


def steal_ticks() -> int:
    """Clock ticks the hypervisor has given other machines while this one's CPUs wanted to
    run (the ``steal`` column of /proc/stat), all CPUs together."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])


def measure_latency(rounds: int = PAIRS) -> dict[str, Any]:
    """The gateway at 200 msg/s to 1k subscribers, beside itself with the fixed window and
    writing every delivery on its own, alternately, ``rounds`` times: the run of median p50,
    the fixed window's median p50 and p99, the bounds they make, and the median CPU ratio."""
    results: list[dict[str, dict[str, Any]]] = []
    steal_before, started = steal_ticks(), time.monotonic()
    with scratch_redis() as redis_server:
        for _ in range(rounds):
            results.append(
                {
                    design: run(design, redis_server, SUBSCRIBERS, 200.0, SECONDS, 0)
                    for design in ("gateway", "gateway-window", "gateway-1write")
                }
            )
    elapsed = time.monotonic() - started
    steal = (steal_ticks() - steal_before) / TICKS / ((os.cpu_count() or 1) * elapsed)

    def median(design: str, key: str) -> float:
        return float(sorted(result[design][key] for result in results)[rounds // 2])

    ratios = sorted(
        r["gateway"]["cpu_us_per_delivery"] / r["gateway-1write"]["cpu_us_per_delivery"]
        for r in results
    )
    adaptive = sorted((r["gateway"] for r in results), key=lambda row: row["latency_p50_ms"])
    chosen = adaptive[rounds // 2]
    window_p50 = median("gateway-window", "latency_p50_ms")
    window_p99 = median("gateway-window", "latency_p99_ms")
    return {
        "p50_ms": chosen["latency_p50_ms"],
        "p99_ms": chosen["latency_p99_ms"],
        "delivered_share": chosen["delivered_share"],
        "cpu_us_per_delivery": chosen["cpu_us_per_delivery"],
        "window_p50_ms": window_p50,
        "window_p99_ms": window_p99,
        "p50_bound_ms": max(LATENCY_200[0], WINDOW_SLACK[0] * window_p50),
        "p99_bound_ms": max(LATENCY_200[1], WINDOW_SLACK[1] * window_p99),
        "cpu_vs_1write": ratios[rounds // 2],
        "pair_ratios": ratios,
        "p50s_ms": [row["latency_p50_ms"] for row in adaptive],
        "steal_share": round(steal, 3),
    }


def main() -> None:
    print(json.dumps({"cpu": measure_ratio(), "latency_200": measure_latency()}))


if __name__ == "__main__":
    main()
