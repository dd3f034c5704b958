"""How busy the replica is, sampled: its loop's lag and its share of a core.

One task wakes every :data:`INTERVAL` seconds and reports how much later than asked it woke
and how much CPU the process used since the last wake. An idle replica reports microseconds
and a few percent; one whose loop is busy (fan-out, a flood of handshakes, a page of history)
reports how long a callback due now waits behind the others, which is the latency every
client of the replica is paying at that moment. Operators see the lag as a histogram; the
adaptive coalescing (:mod:`gateway.coalescing`) steers by both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["INTERVAL", "watch"]

#: Seconds between two measurements: ten a second cost nothing and catch stalls of 100 ms.
INTERVAL = 0.1


async def watch(record: Callable[[float, float], object], interval: float = INTERVAL) -> None:
    """Every ``interval`` seconds until cancelled, call ``record(lag, cpu)``: how late (in
    seconds) the loop ran the timer, and the share of one core the process used since the
    previous call."""
    # Not the loop's clock: uvloop's counts whole milliseconds.
    started, used = time.perf_counter(), time.process_time()
    while True:
        due = started + interval
        await asyncio.sleep(interval)
        now, cpu = time.perf_counter(), time.process_time()
        record(max(0.0, now - due), (cpu - used) / max(now - started, 1e-6))
        started, used = now, cpu
