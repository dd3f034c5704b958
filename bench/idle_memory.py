"""Gateway memory per idle connection: ``python -m bench.idle_memory [--connections N]``.

Starts a real ``wsgateway`` process, opens N real WebSocket clients on loopback (each subscribed
to one channel), and divides the growth of the gateway's RSS by N.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import websockets

from bench.fanout import start_server
from tests.harness import free_port, rss_kib


async def measure(connections: int) -> None:
    port = free_port()
    gateway = await asyncio.to_thread(start_server, "gateway", port)
    try:
        await asyncio.sleep(0.5)
        before = rss_kib(gateway.pid)
        url = f"ws://127.0.0.1:{port}/ws?channels=news"
        clients = []
        for _ in range(connections):
            ws = await websockets.connect(url, ping_interval=None, max_queue=1)
            await ws.recv()
            clients.append(ws)
        await asyncio.sleep(1)
        after = rss_kib(gateway.pid)
        print(
            f"{connections} idle connections: {(after - before) / connections:.1f} KiB each "
            f"(gateway RSS {before} KiB -> {after} KiB)"
        )
        for ws in clients:
            await ws.close()
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=3000)
    asyncio.run(measure(parser.parse_args().connections))


if __name__ == "__main__":
    main()
