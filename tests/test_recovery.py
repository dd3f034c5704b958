"""The proof of history: a numbered sequence survives a killed replica and a killed or cut
Redis, with every client ending with all of it, in order, nothing twice.

Clients are :class:`gateway.client.Client`, the library users get; replicas, Redis and the
publisher are real processes and connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from gateway.client import Client, Message, Resync
from publisher import AsyncPublisher
from publisher.history import HistoryPolicy
from tests.faults import TcpProxy
from tests.harness import GatewayFactory, RedisServer, async_wait_until

CHANNEL = "h.seq"
HISTORY = {
    "GATEWAY_HISTORY_CHANNELS": "h.*",
    "GATEWAY_RECONNECT_MIN": "0.05",
    "GATEWAY_RECONNECT_MAX": "0.3",
    "GATEWAY_PROBE_INTERVAL": "0.3",
    "GATEWAY_PROBE_TIMEOUT": "0.5",
}


def fast_client(url: str | list[str]) -> Client:
    return Client(url, [CHANNEL], backoff_min=0.05, backoff_max=0.5, open_timeout=2.0)


async def collect(client: Client, last: int) -> tuple[list[Message], list[Resync]]:
    """Every event until the message numbered ``last`` (data is the publisher's number)."""
    messages: list[Message] = []
    resyncs: list[Resync] = []
    async for event in client:
        if isinstance(event, Resync):
            resyncs.append(event)
            continue
        assert isinstance(event, Message), event
        messages.append(event)
        if event.data == last:
            return messages, resyncs
    raise AssertionError("iteration ended")


@contextlib.asynccontextmanager
async def numbered_publisher(
    url: str, count: int, interval: float = 0.01
) -> AsyncIterator[list[int]]:
    """Publish 0..count-1 on CHANNEL with history, retrying each number until Redis takes it;
    yields the numbers published so far."""
    publisher = AsyncPublisher(url, history=HistoryPolicy(("h.*",)))
    published: list[int] = []

    async def run() -> None:
        for n in range(count):
            while True:
                try:
                    await publisher.publish(CHANNEL, n, mid=f"m{n}")
                    break
                except (redis.RedisError, OSError):
                    await asyncio.sleep(0.05)
            published.append(n)
            await asyncio.sleep(interval)

    task = asyncio.create_task(run())
    try:
        yield published
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # anything else fails the test
            await task
        await publisher.aclose()


def assert_complete(messages: list[Message], count: int) -> None:
    # A publish retried after Redis ran it but before its answer arrived is a second message
    # with the same mid (publishing is at least once); nothing else may repeat or be missing.
    numbers = [m.data for i, m in enumerate(messages) if i == 0 or m.mid != messages[i - 1].mid]
    assert numbers == list(range(count))
    offsets = [m.offset or 0 for m in messages]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert offsets[0] > 0


async def test_a_killed_replica_loses_nothing_for_clients_that_reconnect(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    env = {**HISTORY, "GATEWAY_REDIS_URL": redis_server.url}
    first, second = gateway_factory(env), gateway_factory(env)
    count = 300
    clients = [fast_client([first.ws_url, second.ws_url]) for _ in range(8)]
    for c in clients:
        c.start()
    try:
        await async_wait_until(lambda: all(c.positions.get(CHANNEL) for c in clients))
        results = [asyncio.create_task(collect(c, count - 1)) for c in clients]
        async with numbered_publisher(redis_server.url, count):
            await async_wait_until(lambda: all(c.positions[CHANNEL][0] >= 100 for c in clients))
            first.signal(signal.SIGKILL)  # no drain, no close frames: the clients just lose it
            outcomes = await asyncio.wait_for(asyncio.gather(*results), 60)
    finally:
        for c in clients:
            await c.close()
    for c, (messages, resyncs) in zip(clients, outcomes, strict=True):
        assert resyncs == []
        assert_complete(messages, count)
        assert c.connects == 2  # the first replica, then the second one


@pytest.mark.parametrize("outage", ["redis killed", "link frozen"])
async def test_a_replica_cut_from_redis_catches_up_from_the_stream(
    tmp_path: Path, gateway_factory: GatewayFactory, outage: str
) -> None:
    """Redis dies (with its stream on disk) or the replica's link to it goes silent, while
    messages keep being published; the replica's clients stay connected and get them all."""
    server = RedisServer(tmp_path / "durable", durable=True)
    server.start()
    proxy = TcpProxy(server.port).start()
    count = 1000
    try:
        gateway = gateway_factory({**HISTORY, "GATEWAY_REDIS_URL": proxy.url})
        clients = [fast_client(gateway.ws_url) for _ in range(5)]
        for c in clients:
            c.start()
        await async_wait_until(lambda: all(c.positions.get(CHANNEL) for c in clients))
        results = [asyncio.create_task(collect(c, count - 1)) for c in clients]
        async with numbered_publisher(server.url, count, interval=0.004) as published:
            await async_wait_until(lambda: all(c.positions[CHANNEL][0] >= 60 for c in clients))
            # The replica cannot come back before the publisher has gone on without it.
            proxy.refusing = True
            if outage == "redis killed":
                server.kill()
            else:
                proxy.freeze()  # open, delivering nothing: only the probe notices
            await async_wait_until(lambda: gateway.http_status("/readyz") == 503, timeout=10)
            if outage == "redis killed":
                server.start()  # same port and directory: the append-only file comes back
            missed_from = len(published)
            await async_wait_until(lambda: len(published) >= missed_from + 30, timeout=10)
            proxy.refusing = False
            outcomes = await asyncio.wait_for(asyncio.gather(*results), 60)
        for c, (messages, resyncs) in zip(clients, outcomes, strict=True):
            assert resyncs == []
            assert_complete(messages, count)
            assert c.connects == 1  # the clients never noticed
        # What the replica missed came from the stream, not from luck.
        assert gateway.metric("wsgateway_history_total") >= 30
        for c in clients:
            await c.close()
    finally:
        proxy.stop()
        server.stop()
