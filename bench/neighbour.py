"""A busy neighbour on the replica's core: ``python -m bench.neighbour [--rounds 3]``.

The fan-out benchmark's 1k-subscriber scenario (``bench.fanout.run``: one replica pinned to
the server CPU, load clients on the other, one real Redis) with a process that spins on the
server CPU throughout, as another pod on the same node or another VM's work on the same host
would: the replica gets about half its core. This gateway as configured by default (adaptive
coalescing) and with the fixed 20 ms window, at 100 and 200 msg/s, alternately ``--rounds``
times; printed as JSON, medians of the rounds, p50 and p99 latency and CPU per delivery.

An adaptive replica that steered by its CPU share alone read 0.5 of a core while saturated
and kept writing through; docs/performance.md ("Sharing a core") has the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from bench.fanout import SERVER_CPU, medians, run, scratch_redis

DESIGNS = ("gateway", "gateway-window")
#: The neighbour's program: a spin, told apart from any other by its text.
SPIN = "while 'bench.neighbour': pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 200.0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    neighbour = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        os.sched_setaffinity(neighbour.pid, {SERVER_CPU})
        with scratch_redis() as redis_server:
            for _ in range(args.rounds):
                for rate in args.rates:
                    for design in DESIGNS:
                        rows.append(
                            run(design, redis_server, args.subscribers, rate, args.seconds, 0)
                        )
    finally:
        neighbour.kill()
        neighbour.wait()
    fields = "design rate runs latency_p50_ms latency_p99_ms cpu_us_per_delivery delivered_share"
    print(
        json.dumps(
            [{field: row[field] for field in fields.split()} for row in medians(rows)], indent=1
        )
    )


if __name__ == "__main__":
    main()
