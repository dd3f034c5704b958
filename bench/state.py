"""Delta compression on a state stream: ``python -m bench.state [--clients 1000]``.

One replica pinned to the server CPU (as in ``python -m bench``) on a real Redis, with a
history channel that allows deltas; ``--clients`` subscribers in this process on the other
CPU, each counting the bytes it receives from the socket (the WebSocket frames, headers
included: what crosses the wire); a publisher appending ``--updates`` versions of a 4 KiB
JSON document, a few fields changed in each, at ``--rate`` a second. The same run twice,
alternating, ``--rounds`` times: the subscribers asking for deltas, and not. Reported per
run: wire bytes and replica CPU microseconds per delivery, and the ratios of the two modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from websockets.frames import Frame, Opcode

from bench.fanout import CLIENT_CPU, bench_redis, cpu_seconds, start_server
from publisher import Publisher
from tests.harness import free_port

RESULTS = Path(__file__).parent / "results" / "state.json"
SETTINGS = {
    "GATEWAY_HISTORY_CHANNELS": "doc.*",
    "GATEWAY_DELTA_CHANNELS": "doc.*",
    "GATEWAY_QUEUE_MAX_MESSAGES": "4096",
}


def document(version: int) -> dict[str, Any]:
    """A dashboard of 60 rows, about 4 KiB as JSON; each version changes three values."""
    rows: list[dict[str, Any]] = [
        {"id": n, "name": f"instrument {n}", "price": round(100 + n * 1.25, 2), "volume": n * 10}
        for n in range(60)
    ]
    for k in range(3):
        row = rows[(version * 7 + k * 13) % 60]
        row["price"] = round(row["price"] + version * 0.01, 2)
        row["volume"] += version
    return {"version": version, "updated": 1_700_000_000_000 + version, "rows": rows}


class Subscriber(asyncio.Protocol):
    """One connection, counting every byte the replica sends it after the handshake."""

    def __init__(self) -> None:
        self.received = 0
        self.buffer = b""
        self.upgraded = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            head, sep, rest = (self.buffer + data).partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            self.upgraded.set_result(head.startswith(b"HTTP/1.1 101"))
            data = rest
        self.received += len(data)

    def send(self, request: dict[str, Any]) -> None:
        assert self.transport is not None
        frame = Frame(Opcode.TEXT, json.dumps(request).encode())
        self.transport.write(frame.serialize(mask=True))


async def subscribers(port: int, count: int) -> list[Subscriber]:
    loop = asyncio.get_running_loop()
    opened: list[Subscriber] = []
    for _ in range(count):
        _, protocol = await loop.create_connection(Subscriber, "127.0.0.1", port)
        assert protocol.transport is not None
        protocol.transport.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert await protocol.upgraded
        opened.append(protocol)
    return opened


async def one_run(
    port: int, pid: int, redis_url: str, deltas: bool, args: argparse.Namespace, channel: str
) -> dict[str, Any]:
    clients = await subscribers(port, args.clients)
    request: dict[str, Any] = {"op": "subscribe", "channel": channel}
    if deltas:
        request["delta"] = "fossil"
    for client in clients:
        client.send(request)
    with Publisher(redis_url) as publisher:
        publisher.publish(channel, document(0))  # a first version, before measuring
        await asyncio.sleep(2.0)
        received = sum(c.received for c in clients)
        cpu = sum(cpu_seconds(pid))
        started = time.monotonic()
        for version in range(1, args.updates + 1):
            publisher.publish(channel, document(version))
            ahead = started + version / args.rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await asyncio.sleep(2.0)  # the last ones reach everybody
        cpu = sum(cpu_seconds(pid)) - cpu
        received = sum(c.received for c in clients) - received
    for client in clients:
        assert client.transport is not None
        client.transport.abort()
    deliveries = args.updates * args.clients
    return {
        "deltas": deltas,
        "clients": args.clients,
        "updates": args.updates,
        "document_bytes": len(json.dumps(document(1), separators=(",", ":"))),
        "wire_bytes_per_delivery": round(received / deliveries, 1),
        "cpu_us_per_delivery": round(cpu * 1e6 / deliveries, 3),
    }


async def bench(port: int, pid: int, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for round_ in range(args.rounds):
        for deltas in (False, True):
            run = await one_run(port, pid, redis_url, deltas, args, f"doc.{round_}.{deltas}")
            print(json.dumps(run), flush=True)
            runs.append(run)

    def median(deltas: bool, key: str) -> float:
        return float(statistics.median(r[key] for r in runs if r["deltas"] is deltas))

    return {
        "runs": runs,
        "bytes_ratio_full_over_delta": round(
            median(False, "wire_bytes_per_delivery") / median(True, "wire_bytes_per_delivery"), 2
        ),
        "cpu_ratio_delta_over_full": round(
            median(True, "cpu_us_per_delivery") / median(False, "cpu_us_per_delivery"), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = bench_redis(Path(tmp))  # on the clients' CPU, like this driver
        port = free_port()
        server = start_server("gateway", port, redis_server.url, **SETTINGS)
        try:
            result = asyncio.run(bench(port, server.pid, redis_server.url, args))
        finally:
            server.terminate()
            server.wait(30)
            redis_server.stop()
    result["machine"] = f"{os.cpu_count()} CPUs; clients on CPU {CLIENT_CPU}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
