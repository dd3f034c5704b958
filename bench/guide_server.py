"""The guide's design, kept faithfully as the baseline every benchmark runs beside this gateway.

This is the "Integrated production example" of the guide in ``shared/seed``: a per-client
bounded ``asyncio.Queue`` (128) drained by a writer task that awaits ``ws.send()`` for each
message, ``put_nowait`` fan-out, and close 1013 for a client whose queue is full. The only
additions are what the benchmark needs to feed it the same traffic as the gateway: it reads
the same Redis channel, turns each envelope into the same ``message`` frame (one JSON decode
and encode per message, as a straightforward implementation would), and clients name their
channel with ``?channels=`` (one channel per server, as in the benchmark).

Run: ``python -m bench.guide_server --port 8766 --redis-url redis://localhost:6379/0``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any

import redis.asyncio as aioredis
import websockets
from websockets.asyncio.server import ServerConnection

CLIENTS: dict[ServerConnection, asyncio.Queue[str]] = {}
QUEUE_DEPTH = 128


async def _writer(ws: ServerConnection, q: asyncio.Queue[str]) -> None:
    """Drain one client's queue onto its socket; exits when the queue is closed."""
    try:
        while True:
            msg = await q.get()
            await ws.send(msg)
            q.task_done()
    except websockets.ConnectionClosed:
        pass


async def handler(ws: ServerConnection) -> None:
    q: asyncio.Queue[str] = asyncio.Queue(maxsize=QUEUE_DEPTH)
    CLIENTS[ws] = q
    writer = asyncio.create_task(_writer(ws, q))
    try:
        async for message in ws:  # inbound from this client
            broadcast(str(message))
    except websockets.ConnectionClosed:
        pass
    finally:
        CLIENTS.pop(ws, None)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


def broadcast(payload: str) -> None:
    """Fan out to every client; disconnect any client that cannot keep up."""
    for ws, q in list(CLIENTS.items()):
        try:
            q.put_nowait(payload)
        except asyncio.QueueFull:
            # Slow consumer: enforce policy — drop the client rather than stall others.
            asyncio.create_task(ws.close(code=1013, reason="too slow"))  # noqa: RUF006 - as in the guide


async def feed(redis_url: str, channel: str) -> None:
    """The benchmark's addition: the same Redis channel the gateway reads, same frames."""
    client: Any = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"ws:{channel}")
    async for item in pubsub.listen():
        if item["type"] != "message":
            continue
        envelope = json.loads(item["data"])
        broadcast(
            json.dumps(
                {
                    "op": "message",
                    "channel": envelope["channel"],
                    "data": envelope["data"],
                    "mid": envelope["mid"],
                    "ts": envelope["ts"],
                },
                separators=(",", ":"),
            )
        )


async def main(port: int, redis_url: str, channel: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    feeder = asyncio.create_task(feed(redis_url, channel))
    async with websockets.serve(
        handler,
        "127.0.0.1",
        port,
        ping_interval=20,  # heartbeat: evict dead peers
        ping_timeout=20,
        max_size=2**20,  # cap inbound message size
    ):
        print(f"guide server on :{port}", flush=True)
        await stop  # block until a signal arrives
        feeder.cancel()
        # Closing all client connections triggers the close handshake.
        await asyncio.gather(
            *(ws.close(code=1001, reason="server shutdown") for ws in list(CLIENTS)),
            return_exceptions=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--channel", default="bench")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.redis_url, args.channel))
