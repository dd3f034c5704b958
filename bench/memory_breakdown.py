"""Where a gateway's memory per idle connection goes: ``python -m bench.memory_breakdown``.

Runs a gateway in this process on uvloop with tracemalloc on, connects N idle clients from a
``bench.loadclient`` process (each subscribed to one channel), and prints the Python
allocations that grew, per connection, grouped by the line that made them, beside the RSS
growth per connection. What tracemalloc cannot see (uvloop's and the kernel's C structures)
is the difference between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tracemalloc

import uvloop

from bench.fanout import start_clients, stop_clients
from gateway.server import Gateway
from gateway.settings import Settings
from tests.harness import rss_kib


async def measure(connections: int, top: int, frames: int) -> None:
    settings = Settings(
        _cli_parse_args=[], host="127.0.0.1", port=0, log_level="warning",
        max_connections=100_000, rate_limit=1000,
    )  # fmt: skip
    gateway = Gateway(settings)
    await gateway.start()
    await asyncio.sleep(0.2)
    gc.collect()
    tracemalloc.start(frames)
    before, rss_before = tracemalloc.take_snapshot(), rss_kib_self()
    url = f"ws://127.0.0.1:{gateway.port}/ws?channels=news"
    clients = await asyncio.to_thread(start_clients, url, connections, 0)
    await asyncio.sleep(1.0)
    gc.collect()
    after, rss_after = tracemalloc.take_snapshot(), rss_kib_self()
    tracemalloc.stop()
    stats = after.compare_to(before, "traceback" if frames > 1 else "lineno")
    traced = sum(s.size_diff for s in stats)
    print(f"{connections} idle connections")
    print(f"  RSS growth:        {(rss_after - rss_before) / connections:7.2f} KiB per connection")
    print(f"  Python allocations:{traced / 1024 / connections:7.2f} KiB per connection")
    print(f"\n  largest growth, bytes per connection (top {top}):")
    for stat in stats[:top]:
        where = stat.traceback.format(limit=frames)
        print(
            f"  {stat.size_diff / connections:8.0f}  {stat.count_diff / connections:5.1f} objects"
        )
        for line in where:
            print("          " + line.strip())
    await asyncio.to_thread(stop_clients, clients)
    await gateway.shutdown()


def rss_kib_self() -> int:
    return rss_kib(os.getpid())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=1, help="traceback depth to group by")
    args = parser.parse_args()
    uvloop.run(measure(args.connections, args.top, args.frames))


if __name__ == "__main__":
    main()
