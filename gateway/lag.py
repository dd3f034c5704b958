"""How late the event loop runs what is due: a replica's saturation, as operators see it.

One task wakes every :data:`INTERVAL` seconds and records how much later than asked it woke.
An idle replica records microseconds; one whose loop is busy (fan-out, a flood of
handshakes, a page of history) records how long a callback due now waits behind the others,
which is the latency every client of the replica is paying at that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["INTERVAL", "watch"]

#: Seconds between two measurements: ten a second cost nothing and catch stalls of 100 ms.
INTERVAL = 0.1


async def watch(record: Callable[[float], object], interval: float = INTERVAL) -> None:
    """Record the loop's lag, in seconds, every ``interval`` seconds until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        record(max(0.0, loop.time() - due))
