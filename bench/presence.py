"""Presence and join/leave: ``python -m bench.presence [--clients 10000]``.

One measured replica (pinned to the server CPU, as in ``python -m bench``) with presence and
join/leave on ``p.*``, a second replica that is killed, one real Redis; the clients run in
this process on the other CPU, each reading every frame it gets. Measured, each with the
replica's CPU and the Redis commands it cost:

* ``paced``: ``--paced`` clients join one channel one after another at ``--rate`` a second,
  then leave the same way: per join and per leave;
* ``join storm``: ``--clients`` clients join one channel at once: until presence counts them
  all, and the join frames each member received;
* ``presence read``: one client pages through that channel's members;
* ``leave storm``: the second replica, holding ``--doomed`` members of the same channel, is
  SIGKILLed: until the measured replica's clients got every leave.

``--fanout`` also runs the fan-out benchmark's 1k-subscriber scenario with and without
presence configured (on other channels), to show it does not touch the fan-out path.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from websockets.asyncio.client import ClientConnection, connect

from bench.fanout import CLIENT_CPU, bench_redis, cpu_seconds, start_server
from bench.fanout import run as fanout_run
from tests.harness import free_port

PRESENCE = {
    "GATEWAY_PRESENCE_CHANNELS": "p.*,q.*",
    "GATEWAY_JOIN_LEAVE_CHANNELS": "p.*",
    "GATEWAY_QUEUE_MAX_MESSAGES": "4096",
}


class Member:
    """One client connection, counting the members named in the frames it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.named: collections.Counter[str] = collections.Counter()
        self.frames: collections.Counter[str] = collections.Counter()
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            frame = json.loads(text)
            op = frame["op"]
            if op in ("join", "leave"):
                self.frames[op] += 1
                self.named[op] += len(frame["members"]) + frame.get("more", 0)
            elif "id" in frame:
                await self.replies.put(frame)

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.ws.send(json.dumps(request))
        async with asyncio.timeout(30):
            return await self.replies.get()


async def open_members(url: str, count: int) -> list[Member]:
    opened: list[Member] = []
    for start in range(0, count, 500):  # in batches: the kernel's accept queue is finite
        batch = await asyncio.gather(
            *(
                connect(url, ping_interval=None, max_size=None)
                for _ in range(min(500, count - start))
            )
        )
        opened.extend(Member(ws) for ws in batch)
    return opened


async def until(predicate: Any, timeout: float) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise TimeoutError
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


class Meter:
    """The measured replica's CPU and Redis's commands over a stretch."""

    def __init__(self, pid: int, client: redis.Redis) -> None:
        self.pid, self.client = pid, client

    def _calls(self) -> collections.Counter[str]:
        stats = self.client.info("commandstats")
        return collections.Counter({name[8:]: int(v["calls"]) for name, v in stats.items()})

    def __enter__(self) -> Meter:
        self.cpu = sum(cpu_seconds(self.pid))
        self._before = self._calls()
        return self

    def __exit__(self, *_: object) -> None:
        self.cpu = sum(cpu_seconds(self.pid)) - self.cpu
        calls = self._calls() - self._before
        # The meter's own INFO calls are not the gateway's.
        calls.pop("info", None)
        self.by_command = dict(calls.most_common())
        self.commands = sum(calls.values())


async def paced(url: str, channel: str, pid: int, r: redis.Redis, args: Any) -> dict[str, Any]:
    clients = await open_members(url, args.paced)
    await asyncio.sleep(1)
    with Meter(pid, r) as joins:
        for m in clients:
            await m.ws.send(json.dumps({"op": "subscribe", "channel": channel}))
            await asyncio.sleep(1 / args.rate)
        await asyncio.sleep(1)
    with Meter(pid, r) as leaves:
        for m in clients[1:]:
            await m.ws.send(json.dumps({"op": "unsubscribe", "channel": channel}))
            await asyncio.sleep(1 / args.rate)
        await asyncio.sleep(1)
    for m in clients:
        await m.ws.close()
    return {
        "clients": args.paced,
        "rate_per_second": args.rate,
        "cpu_us_per_join": round(joins.cpu * 1e6 / args.paced, 1),
        "redis_commands_per_join": round(joins.commands / args.paced, 3),
        "redis_commands_by_name_joins": joins.by_command,
        "cpu_us_per_leave": round(leaves.cpu * 1e6 / (args.paced - 1), 1),
        "redis_commands_per_leave": round(leaves.commands / (args.paced - 1), 3),
        "join_frames_to_the_first": clients[0].frames["join"],
        "members_named_to_the_first": clients[0].named["join"],
    }


async def scenario(
    url: str, doomed_url: str, doomed: Any, pid: int, r: redis.Redis, args: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {}

    # Paced joins and leaves: presence with join/leave frames (p.*), presence alone (q.*),
    # and a channel without either, for the baseline of subscribing at all.
    for label, channel in (
        ("paced_join_leave", "p.paced"),
        ("paced_presence_only", "q.paced"),
        ("paced_no_presence", "n.paced"),
    ):
        out[label] = await paced(url, channel, pid, r, args)

    # The join storm.
    crowd = await open_members(url, args.clients)
    await asyncio.sleep(1)
    with Meter(pid, r) as storm:
        await asyncio.gather(
            *(m.ws.send(json.dumps({"op": "subscribe", "channel": "p.storm"})) for m in crowd)
        )
        sample = crowd[:: max(1, len(crowd) // 100)]
        started = time.perf_counter()
        while True:
            stats = await crowd[0].ask({"op": "presence_stats", "channel": "p.storm", "id": 1})
            if stats["clients"] >= args.clients:
                break
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        await until(lambda: crowd[0].named["join"] >= args.clients, 60)
        await asyncio.sleep(1)
    out["join_storm"] = {
        "clients": args.clients,
        "seconds": round(seconds, 2),
        "presence_clients": stats["clients"],
        "cpu_ms": round(storm.cpu * 1000, 1),
        "cpu_us_per_join": round(storm.cpu * 1e6 / args.clients, 1),
        "redis_commands": storm.commands,
        "redis_commands_by_name": storm.by_command,
        "join_frames_per_member_median": sorted(m.frames["join"] for m in sample)[len(sample) // 2],
        "members_named_to_the_first": crowd[0].named["join"],
    }

    # Reading a big channel's presence.
    with Meter(pid, r) as read:
        started = time.perf_counter()
        cursor, listed, pages = "0", 0, 0
        while True:
            page = await crowd[0].ask(
                {"op": "presence", "channel": "p.storm", "cursor": cursor, "id": 2}
            )
            listed += len(page["members"])
            pages += 1
            cursor = page["cursor"]
            if cursor == "0":
                break
        read_seconds = time.perf_counter() - started
    out["presence_read"] = {
        "members": listed,
        "pages": pages,
        "ms": round(read_seconds * 1000, 1),
        "cpu_ms": round(read.cpu * 1000, 1),
        "redis_commands": read.commands,
    }

    # The leave storm of a dead replica.
    doomed_members = await open_members(doomed_url, args.doomed)
    await asyncio.gather(
        *(m.ws.send(json.dumps({"op": "subscribe", "channel": "p.storm"})) for m in doomed_members)
    )
    await until(lambda: crowd[0].named["join"] >= args.clients + args.doomed, 120)
    await asyncio.sleep(5)  # a lease renewal records them
    for m in doomed_members:
        m.task.cancel()
    with Meter(pid, r) as reap:
        doomed.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        for m in doomed_members:
            m.ws.transport.abort()  # their replica is gone: nothing to close
        await until(lambda: crowd[0].named["leave"] >= args.doomed, 120)
        first_done = time.perf_counter() - killed
        await until(lambda: all(m.named["leave"] >= args.doomed for m in sample), 120)
        all_done = time.perf_counter() - killed
        await asyncio.sleep(1)
    out["leave_storm"] = {
        "members_of_the_dead_replica": args.doomed,
        "room_members_told": args.clients,
        "named_in_frames_to_the_first": crowd[0].named["leave"],
        "lease_seconds": float(os.environ.get("GATEWAY_PRESENCE_LEASE", "10")),
        "seconds_to_first_member_told_all": round(first_done, 2),
        "seconds_to_sampled_members_told_all": round(all_done, 2),
        "leave_frames_per_member": crowd[0].frames["leave"],
        "cpu_ms": round(reap.cpu * 1000, 1),
        "redis_commands": reap.commands,
        "redis_commands_by_name": reap.by_command,
    }
    for m in crowd:
        await m.ws.close()
    return out


def fanout(workdir: Path, seconds: float) -> list[dict[str, Any]]:
    """The 1k-subscriber fan-out, presence configured for other channels or not."""
    redis_server = bench_redis(workdir / "fanout")
    rows = []
    try:
        for rate in (20, 200):
            for label, settings in (("without presence", {}), ("with presence on p.*", PRESENCE)):
                row = fanout_run("gateway", redis_server, 1000, rate, seconds, 0, settings)
                rows.append(
                    {
                        "presence": label,
                        "rate": rate,
                        **{
                            k: row[k]
                            for k in ("cpu_us_per_delivery", "latency_p50_ms", "latency_p99_ms")
                        },
                    }
                )
    finally:
        redis_server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--doomed", type=int, default=5000)
    parser.add_argument("--paced", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--lease", type=float, default=3)
    parser.add_argument("--fanout", action="store_true")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    os.environ["GATEWAY_PRESENCE_LEASE"] = str(args.lease)
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = bench_redis(Path(tmp))
        settings = {**PRESENCE, "GATEWAY_PRESENCE_LEASE": str(args.lease)}
        port, doomed_port = free_port(), free_port()
        server = start_server("gateway", port, redis_server.url, **settings)
        doomed = start_server("gateway", doomed_port, redis_server.url, **settings)
        os.sched_setaffinity(doomed.pid, {CLIENT_CPU})
        r = redis.Redis.from_url(redis_server.url)
        try:
            result = asyncio.run(
                scenario(
                    f"ws://127.0.0.1:{port}/ws",
                    f"ws://127.0.0.1:{doomed_port}/ws",
                    doomed,
                    server.pid,
                    r,
                    args,
                )
            )
        finally:
            for process in (server, doomed):
                if process.poll() is None:
                    process.terminate()
                    process.wait(30)
            redis_server.stop()
        if args.fanout:
            result["fanout"] = fanout(Path(tmp), args.seconds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
