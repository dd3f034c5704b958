"""A reconnect storm on a history channel: ``python -m bench.resume``.

``--clients`` connections (one process, asyncio) subscribe at the same moment with ``since``
``--missed`` messages behind the top of one history channel, as the clients of a killed
replica do when they reach the others. Measured: the time until every client has its whole
replay, and the CPU the gateway and Redis spent on it, per resuming client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from websockets.asyncio.client import connect

from bench.fanout import bench_redis, cpu_seconds, start_server
from publisher import Publisher
from publisher.history import HistoryPolicy
from tests.harness import free_port


def redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def storm(url: str, clients: int, since: int, epoch: str, top: int) -> float:
    """Open every connection, then subscribe them all at once; seconds until all replayed."""
    sockets = [await connect(url, ping_interval=None, max_size=None) for _ in range(clients)]
    request = json.dumps(
        {"op": "subscribe", "channel": "h.storm", "since": {"offset": since, "epoch": epoch}}
    )

    async def resume(ws: Any) -> None:
        await ws.send(request)
        reply = json.loads(await ws.recv())
        assert reply.get("recovered") is True, reply
        received = 0
        while received < top - since:
            received += (await ws.recv()).count('"op":"message"')

    started = time.perf_counter()
    await asyncio.gather(*(resume(ws) for ws in sockets))
    elapsed = time.perf_counter() - started
    for ws in sockets:
        await ws.close()
    return elapsed


def run(clients: int, missed: int, size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = bench_redis(Path(tmp))
        port = free_port()
        server = start_server(
            "gateway",
            port,
            redis_server.url,
            GATEWAY_HISTORY_CHANNELS="h.*",
            GATEWAY_HISTORY_SIZE=str(size),
            GATEWAY_MAX_CONNECTIONS=str(clients + 10),
            GATEWAY_DRAIN_SECONDS="0.5",
        )
        try:
            with Publisher(redis_server.url, history=HistoryPolicy(("h.*",), size=size)) as pub:
                for n in range(size):
                    pub.publish("h.storm", {"n": n, "pad": "x" * 100})
            r = redis.Redis.from_url(redis_server.url)
            epoch = r.hget("{ws:h.storm}:meta", "epoch").decode()  # type: ignore[union-attr]
            gateway_before, redis_before = sum(cpu_seconds(server.pid)), redis_cpu(r)
            elapsed = asyncio.run(
                storm(f"ws://127.0.0.1:{port}/ws", clients, size - missed, epoch, size)
            )
            gateway_cpu = sum(cpu_seconds(server.pid)) - gateway_before
            redis_used = redis_cpu(r) - redis_before
            r.close()
        finally:
            server.terminate()
            server.wait(15)
            redis_server.stop()
    return {
        "clients": clients,
        "missed": missed,
        "seconds": round(elapsed, 3),
        "gateway_cpu_ms_per_client": round(gateway_cpu * 1000 / clients, 3),
        "redis_cpu_ms_per_client": round(redis_used * 1000 / clients, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--missed", type=int, default=50)
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(run(args.clients, args.missed, args.size)))


if __name__ == "__main__":
    main()
