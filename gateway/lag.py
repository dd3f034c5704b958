"""How busy the replica is, sampled: its loop's lag, its share of a core, and its wait for one.

One task wakes every :data:`INTERVAL` seconds and reports how much later than asked it woke,
how much CPU the process used since the last wake, and how long its loop waited meanwhile for
a CPU to run on (a core it shares with a busy neighbour). An idle replica reports microseconds
and a few percent; one whose loop is busy (fan-out, a flood of handshakes, a page of history)
reports how long a callback due now waits behind the others, which is the latency every
client of the replica is paying at that moment. Operators see the lag as a histogram; the
adaptive coalescing (:mod:`gateway.coalescing`) steers by all three."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["INTERVAL", "waited", "watch"]

#: Seconds between two measurements: ten a second cost nothing and catch stalls of 100 ms.
INTERVAL = 0.1

#: Per thread: nanoseconds run on a CPU, nanoseconds waited on a run queue, time slices.
SCHEDSTAT = "/proc/thread-self/schedstat"


def waited(thread: int | None = None) -> float:
    """Seconds a thread of this process has waited on a run queue for a CPU, in all (Linux;
    0 elsewhere): the calling thread's, or the one whose native id is ``thread``.

    A replica that shares its core with another busy process (a noisy neighbour, a pod beside
    it) gets part of it: its CPU share then reads 0.5 while its loop is saturated, and the
    time it waited for the core is the other half. (Reading it takes microseconds.)"""
    path = SCHEDSTAT if thread is None else f"/proc/self/task/{thread}/schedstat"
    try:
        with open(path, "rb") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


async def watch(
    record: Callable[[float, float, float], object], interval: float = INTERVAL
) -> None:
    """Every ``interval`` seconds until cancelled, call ``record(lag, cpu, wait)``: how late
    (in seconds) the loop ran the timer, the share of one core the process used since the
    previous call, and the share of that time the loop's thread waited for a CPU
    (:func:`waited`)."""
    # Not the loop's clock: uvloop's counts whole milliseconds.
    started, used, queued = time.perf_counter(), time.process_time(), waited()
    while True:
        due = started + interval
        await asyncio.sleep(interval)
        now, cpu, wait = time.perf_counter(), time.process_time(), waited()
        elapsed = max(now - started, 1e-6)
        record(max(0.0, now - due), (cpu - used) / elapsed, (wait - queued) / elapsed)
        started, used, queued = now, cpu, wait
