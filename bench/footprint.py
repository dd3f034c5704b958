"""What presence memberships and idempotency keys cost: ``python -m bench.footprint``.

The figures of docs/limits.md, measured on real processes:

* a presence membership, on the replica (the Python objects it holds, counted by
  tracemalloc: RSS moves by more than that with the allocators' arenas) and in Redis
  (``used_memory``: the channel's three keys and the replica's lease set): ``--members``
  connections with tokens whose ``info`` claim is ``--info`` bytes subscribe to a channel
  with presence, then to a second one, against the same connections on a channel without;
* an idempotency key in Redis: ``--messages`` appends to a history channel with keys of
  ``--key`` characters, against the same appends without keys.

Prints one JSON object (``--out`` writes it too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import jwt
import redis
from websockets.asyncio.client import ClientConnection, connect

from publisher import Publisher
from publisher.history import HistoryPolicy
from tests.harness import RedisServer, ThreadedGateway, wait_until

SECRET = "footprint-secret-footprint-secret-0123"


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def connected(url: str, count: int, info: int) -> list[ClientConnection]:
    """``count`` connections of users with an ``info`` claim of about ``info`` bytes."""
    sockets = []
    for n in range(count):
        claims: dict[str, Any] = {
            "sub": f"user-{n:06d}",
            "exp": int(time.time()) + 3600,
            "channels": ["*"],
        }
        if info:
            claims["info"] = {"name": f"User {n}", "bio": "x" * max(0, info - 40)}
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        sockets.append(await connect(f"{url}?token={token}", ping_interval=None))
    return sockets


async def subscribe_all(sockets: list[ClientConnection], channel: str) -> None:
    for ws in sockets:
        await ws.send(json.dumps({"op": "subscribe", "channel": channel}))
    for ws in sockets:
        await ws.recv()


def _gateway_kib(snapshot: tracemalloc.Snapshot) -> float:
    """What the gateway's own code holds: its modules' lines (and what they made of msgspec
    and the standard library), not the test clients' websockets objects."""
    ours = snapshot.filter_traces([tracemalloc.Filter(True, "*/gateway/*")])
    return sum(stat.size for stat in ours.statistics("filename")) / 1024


async def presence_cost(workdir: Path, members: int, info: int) -> dict[str, Any]:
    redis_server = RedisServer(workdir / "redis")
    redis_server.start()
    gateway = ThreadedGateway(
        redis_url=redis_server.url,
        jwt_secret=SECRET,
        presence_channels="p.*",
        log_level="warning",
        max_connections_per_user=0,
        rate_limit=1000,
    ).start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        sockets = await connected(gateway.ws_url, members, info)
        await subscribe_all(sockets, "warm.1")
        await asyncio.sleep(0.5)
        held: dict[str, float] = {}
        redis_bytes: dict[str, int] = {}
        # The same connections subscribe to one more channel without presence, then to one
        # with it: the difference is what presence adds to a subscription (Python objects
        # on the replica, as tracemalloc counts them; and Redis' used_memory).
        tracemalloc.start()
        for channel in ("plain.1", "p.1", "p.2"):
            before, before_redis = _gateway_kib(tracemalloc.take_snapshot()), used_memory(client)
            await subscribe_all(sockets, channel)
            if channel != "plain.1":  # written and recorded in the lease
                key = "{ws:" + channel + "}:presence"
                wait_until(lambda key=key: client.hlen(key) == members, timeout=60)
            await asyncio.sleep(0.5)
            held[channel] = _gateway_kib(tracemalloc.take_snapshot()) - before
            redis_bytes[channel] = used_memory(client) - before_redis
        tracemalloc.stop()
        for ws in sockets:
            await ws.close()
        return {
            "members": members,
            "info_bytes": info,
            # The first presence channel of a connection holds its entry (its info); each
            # further one a reference to it.
            "replica_kib_first_membership": round((held["p.1"] - held["plain.1"]) / members, 2),
            "replica_kib_further_membership": round((held["p.2"] - held["plain.1"]) / members, 2),
            "redis_bytes_per_member": round(
                (redis_bytes["p.2"] - redis_bytes["plain.1"]) / members
            ),
        }
    finally:
        client.close()
        gateway.stop()
        redis_server.stop()


def idempotency_cost(workdir: Path, messages: int, key: int) -> dict[str, Any]:
    redis_server = RedisServer(workdir / "redis-keys")
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    policy = HistoryPolicy(("h.*",), size=messages, ttl=3600)
    try:
        growth = {}
        with Publisher(redis_server.url, history=policy) as publisher:
            # Warm-up first: Redis' first stream allocates more than later ones.
            for channel, keyed in (("h.warm", False), ("h.plain", False), ("h.keyed", True)):
                before = used_memory(client)
                for n in range(messages):
                    idempotency = f"{n:08d}".ljust(key, "k") if keyed else None
                    publisher.append(channel, n, mid=f"m{n}", idempotency_key=idempotency)
                growth[channel] = used_memory(client) - before
        return {
            "messages": messages,
            "key_characters": key,
            "redis_bytes_per_key": round((growth["h.keyed"] - growth["h.plain"]) / messages),
        }
    finally:
        client.close()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--info", type=int, nargs="+", default=[0, 1000])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--key", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"presence": [], "idempotency": []}
    with tempfile.TemporaryDirectory() as tmp:
        for info in args.info:
            workdir = Path(tmp) / f"presence-{info}"
            results["presence"].append(asyncio.run(presence_cost(workdir, args.members, info)))
        for key in args.key:
            results["idempotency"].append(
                idempotency_cost(Path(tmp) / f"keys-{key}", args.messages, key)
            )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
