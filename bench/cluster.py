"""One Redis node against a three-primary Redis Cluster (sharded pub/sub), same gateways:
``python -m bench.cluster``.

Two gateway replicas, each with ``--subscribers`` clients subscribed to 12 channels (spread
over the cluster's three primaries), receive ``--rate`` messages a second for ``--seconds``,
first through one Redis node (``PUBLISH``), then through a cluster of three primaries with
one replica each (``SPUBLISH``). Reported for each: deliveries a second, and the CPU all
Redis processes spent per published message and per delivered message (replicas included,
as they run in production).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fanout import cpu_seconds, start_clients, start_server, stop_clients
from publisher import Publisher
from tests.harness import RedisClusterServers, RedisServer, free_port

CHANNELS = [f"c{n}" for n in range(12)]


def _redis_cpu(pids: list[int]) -> float:
    return sum(sum(cpu_seconds(pid)) for pid in pids)


def measure(
    name: str, url: str, pids: list[int], subscribers: int, rate: float, seconds: float
) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    servers = [start_server("gateway", port, url) for port in ports]
    clients = []
    try:
        for port in ports:
            query = ",".join(CHANNELS)
            clients += start_clients(f"ws://127.0.0.1:{port}/ws?channels={query}", subscribers, 0)
        time.sleep(1.0)
        messages = int(rate * seconds)
        pad = "x" * 90
        with Publisher(url) as publisher:
            before = _redis_cpu(pids)
            started = time.monotonic()
            for n in range(messages):
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                publisher.publish(CHANNELS[n % len(CHANNELS)], {"sent": time.time(), "pad": pad})
            elapsed = time.monotonic() - started
            time.sleep(2.0)
            redis_cpu = _redis_cpu(pids) - before
        results = stop_clients(clients)
        clients = []
    finally:
        for client in clients:
            client.kill()
        for server in servers:
            server.terminate()
            server.wait(15)
    deliveries = sum(r["frames"] for r in results)
    return {
        "backplane": name,
        "messages": messages,
        "deliveries": deliveries,
        "delivered_share": round(deliveries / (messages * 2 * subscribers), 4),
        "deliveries_per_second": round(deliveries / elapsed),
        "redis_cpu_us_per_message": round(redis_cpu * 1e6 / messages, 2),
        "redis_cpu_us_per_delivery": round(redis_cpu * 1e6 / deliveries, 4) if deliveries else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=100, help="per gateway replica")
    parser.add_argument("--rate", type=float, default=1000.0, help="messages a second")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        single = RedisServer(Path(tmp) / "single")
        single.start()
        try:
            assert single.process is not None
            rows.append(
                measure(
                    "one node", single.url, [single.process.pid],
                    args.subscribers, args.rate, args.seconds,
                )
            )  # fmt: skip
        finally:
            single.stop()
        cluster = RedisClusterServers(Path(tmp) / "cluster").start()
        try:
            pids = [node.process.pid for node in cluster.nodes if node.process is not None]
            rows.append(
                measure(
                    "cluster, 3 primaries", cluster.url, pids,
                    args.subscribers, args.rate, args.seconds,
                )
            )  # fmt: skip
        finally:
            cluster.stop()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
