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

from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RawClient,
    RedisServer,
    async_wait_until,
    client,
    recv_json,
)

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
        # Long enough that the evicted client, reading again, gets the close frame itself.
        "GATEWAY_CLOSE_TIMEOUT": "10",
    }


async def publish_flood(redis_server: RedisServer, count: int = MESSAGES, start: int = 0) -> None:
    """Publish ``count`` numbered envelopes, paced so healthy clients keep up easily.

    From a thread with a blocking client: the test's clients share this loop, and a publisher
    on it would stop them reading while it publishes (a healthy client would look stalled).
    """

    def publish() -> None:
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
                    time.sleep(0.005)
        finally:
            publisher.close()

    await asyncio.to_thread(publish)


async def collect(ws: ClientConnection, count: int) -> list[int]:
    return [(await recv_json(ws, timeout=10))["data"]["n"] for _ in range(count)]


async def drain(
    ws: ClientConnection, timeout: float = 5.0, until_closed: bool = False
) -> list[int]:
    """Read a resumed client until it is closed (or, unless ``until_closed``, quiet);
    return the message numbers."""
    numbers: list[int] = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            try:
                numbers.append((await recv_json(ws, timeout=timeout))["data"]["n"])
            except TimeoutError:
                if until_closed:
                    raise
                break
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
    # Evicted: what was already written, then a close frame 1013 behind it.
    got = await drain(outcome.stalled, until_closed=True)
    assert got == list(range(len(got))) and len(got) < MESSAGES  # a prefix, in order
    assert (outcome.stalled.close_code, outcome.stalled.close_reason) == (1013, "slow consumer")
    assert outcome.gateway.closed(1013) == 1
    assert outcome.gateway.running


async def test_an_evicted_client_that_never_reads_again_is_reset_at_the_close_timeout(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """The close frame sits behind data the client never reads: the replica waits
    GATEWAY_CLOSE_TIMEOUT for the closing handshake, then resets the socket and forgets it."""
    gateway = gateway_factory({**gateway_env(redis_server, "close"), "GATEWAY_CLOSE_TIMEOUT": "1"})
    stalled = RawClient(gateway.ws_url + "?channels=feed", rcvbuf=4096)
    try:
        await publish_flood(redis_server, count=100)
        await async_wait_until(lambda: gateway.closed(1013) == 1)
        evicted = time.monotonic()
        await async_wait_until(lambda: gateway.metric("wsgateway_connections_open") == 0)
        assert time.monotonic() - evicted < 1 + 2  # the close timeout, and slack for a busy VM
        assert gateway.metric("wsgateway_sockets_open") == 1  # this request's: the client's is gone
        assert stalled.ends_with_reset()
    finally:
        stalled.close()


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
