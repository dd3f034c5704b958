"""Gateway memory per idle connection: ``python -m bench.idle_memory [--connections N]``.

Starts a real ``wsgateway`` process, opens N real WebSocket clients on loopback (each subscribed
to one channel), and divides the growth of the gateway's RSS by N.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import websockets


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(port: int, connections: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_MAX_CONNECTIONS": str(connections + 10),
    }
    gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return gateway


async def measure(connections: int) -> None:
    port = free_port()
    gateway = await asyncio.to_thread(start_gateway, port, connections)
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
