"""A client that stops reading meets the slow-consumer policy; everyone else gets everything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.harness import GatewayFactory, GatewayProcess, RedisServer, client, recv_json

MESSAGES = 400
PAD = "x" * 4000  # ~4 KB a message: the stalled client's buffers fill within a few dozen


@contextlib.asynccontextmanager
async def stalled_client(url: str) -> AsyncIterator[ClientConnection]:
    """A real client whose application stops reading: tiny receive buffer, one-message queue."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.split(":")[2].split("/")[0])))
    async with client(url, sock=sock, max_queue=1, close_timeout=1) as ws:
        yield ws


def gateway_env(redis_server: RedisServer, policy: str) -> dict[str, str]:
    return {
        "GATEWAY_REDIS_URL": redis_server.url,
        "GATEWAY_SLOW_CONSUMER_POLICY": policy,
        "GATEWAY_QUEUE_MAX_MESSAGES": "50",
        "GATEWAY_SEND_BUFFER": "4096",
        "GATEWAY_WRITE_LIMIT": "4096",
        "GATEWAY_CLOSE_TIMEOUT": "1",
    }


async def publish_flood(redis_server: RedisServer, count: int = MESSAGES, start: int = 0) -> None:
    """Publish ``count`` numbered envelopes, paced so healthy clients keep up easily."""
    publisher = redis.Redis.from_url(redis_server.url)
    try:
        for n in range(start, start + count):
            payload = json.dumps(
                {
                    "v": 1,
                    "channel": "feed",
                    "data": {"n": n, "pad": PAD},
                    "mid": f"m{n}",
                    "ts": int(time.time() * 1000),
                }
            )
            publisher.publish("ws:feed", payload)
            if n % 10 == 9:
                await asyncio.sleep(0.005)
    finally:
        publisher.close()


async def collect(ws: ClientConnection, count: int) -> list[int]:
    return [(await recv_json(ws, timeout=10))["data"]["n"] for _ in range(count)]


async def drain(ws: ClientConnection, timeout: float = 5.0) -> list[int]:
    """Read a resumed client until it is closed or quiet; return the message numbers."""
    numbers: list[int] = []
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while True:
            numbers.append((await recv_json(ws, timeout=timeout))["data"]["n"])
    return numbers


@dataclass
class Flood:
    """The outcome of flooding a channel with one stalled subscriber among healthy ones."""

    gateway: GatewayProcess
    stalled: ClientConnection


@pytest.fixture
async def flood(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> AsyncIterator[Callable[[str], Awaitable[Flood]]]:
    """Start a replica with ``policy``, flood it, and check that healthy clients got everything."""
    async with contextlib.AsyncExitStack() as stack:

        async def run(policy: str) -> Flood:
            gateway = gateway_factory(gateway_env(redis_server, policy))
            url = gateway.ws_url + "?channels=feed"
            healthy = [await stack.enter_async_context(client(url)) for _ in range(2)]
            stalled = await stack.enter_async_context(stalled_client(url))
            for ws in (*healthy, stalled):
                assert (await recv_json(ws))["op"] == "subscribed"
            readers = [asyncio.create_task(collect(ws, MESSAGES)) for ws in healthy]
            await publish_flood(redis_server)
            for numbers in await asyncio.gather(*readers):
                assert numbers == list(range(MESSAGES))  # every message, in order
            return Flood(gateway, stalled)

        yield run


async def test_close_policy_evicts_the_stalled_client_and_spares_the_others(
    flood: Callable[[str], Awaitable[Flood]],
) -> None:
    outcome = await flood("close")
    # Evicted: a close frame behind data it never read, then a reset after close_timeout.
    await asyncio.sleep(1.5)
    got = await drain(outcome.stalled)
    assert len(got) < MESSAGES
    assert outcome.stalled.close_code in (1013, 1006)
    assert "closing slow consumer" in outcome.gateway.logs()
    assert outcome.gateway.running


async def test_drop_oldest_keeps_the_stalled_client_with_the_newest_messages(
    flood: Callable[[str], Awaitable[Flood]], redis_server: RedisServer
) -> None:
    outcome = await flood("drop-oldest")
    got = await drain(outcome.stalled, timeout=1.0)
    assert got == sorted(got) and len(set(got)) == len(got)  # in order, no duplicates
    assert got[-50:] == list(range(MESSAGES - 50, MESSAGES))  # the queue kept the newest
    assert got[:50] != list(range(50))  # the oldest queued ones made way
    assert len(got) < MESSAGES
    # Still subscribed and healthy once it reads again.
    await publish_flood(redis_server, count=1, start=MESSAGES)
    assert await collect(outcome.stalled, 1) == [MESSAGES]


async def test_drop_newest_keeps_what_was_queued(
    flood: Callable[[str], Awaitable[Flood]], redis_server: RedisServer
) -> None:
    outcome = await flood("drop-newest")
    got = await drain(outcome.stalled, timeout=1.0)
    assert got == sorted(got) and len(set(got)) == len(got)  # in order, no duplicates
    # What the queue held when it filled was kept: the first 50 queued plus what the
    # kernel had already taken arrive without a gap; the drops came after them.
    assert got[:50] == list(range(50))
    assert len(got) < MESSAGES
    await publish_flood(redis_server, count=1, start=MESSAGES)
    assert await collect(outcome.stalled, 1) == [MESSAGES]
