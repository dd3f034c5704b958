"""The asyncio client library against real gateways and real sockets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.client import Client, ClientError, Event, Message, Resync
from tests.harness import GatewayFactory, async_wait_until, free_port


class Ceilings(random.Random):
    """Full jitter at its ceiling, remembering each ceiling (the backoff the client chose)."""

    def __init__(self) -> None:
        super().__init__()
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.ceilings.append(b)
        return b


async def next_event(iterator: AsyncIterator[Event]) -> Event:
    return await asyncio.wait_for(anext(iterator), 10)


async def test_backoff_grows_while_connections_drop_at_once_and_resets_after_a_stable_one() -> None:
    hold = {"seconds": 0.0}

    async def flaky(ws: ServerConnection) -> None:
        await asyncio.sleep(hold["seconds"])  # then close: the client reconnects

    port = free_port()
    async with serve(flaky, "127.0.0.1", port):
        rng = Ceilings()
        client = Client(
            f"ws://127.0.0.1:{port}/ws",
            backoff_min=0.01,
            backoff_max=0.08,
            stable_after=0.3,
            rng=rng,
        )
        client.start()
        await async_wait_until(lambda: client.connects >= 6)
        # Accepted and dropped at once: every reconnect counts as a failure.
        assert rng.ceilings[:6] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
        hold["seconds"] = 0.4  # now connections stay up longer than stable_after
        seen = len(rng.ceilings)
        await async_wait_until(lambda: len(rng.ceilings) >= seen + 3, timeout=10)
        assert rng.ceilings[seen + 1 : seen + 3] == [0.01, 0.01]  # reset after each stable one
        await client.close()


async def test_a_lost_history_is_reported_before_the_next_message(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(
        {"GATEWAY_HISTORY_CHANNELS": "h.*", "GATEWAY_ANONYMOUS_PUBLISH": "h.*"}
    )
    async with Client(gateway.ws_url, ["h.news"], backoff_min=0.05, backoff_max=0.2) as client:
        events = aiter(client)
        await async_wait_until(lambda: "h.news" in client.positions)
        await client.publish("h.news", "first")
        first = await next_event(events)
        assert isinstance(first, Message) and (first.data, first.offset) == ("first", 1)

        # The embedded backplane keeps history in the process: a restart loses it.
        gateway.stop()
        gateway.start()
        await async_wait_until(lambda: client.connects == 2 and client.connected.is_set())
        await async_wait_until(lambda: client.positions["h.news"][1] != first.epoch)
        await client.publish("h.news", "second")
        assert await next_event(events) == Resync("h.news", "not_recovered")
        second = await next_event(events)
        assert isinstance(second, Message) and (second.data, second.offset) == ("second", 1)

        with pytest.raises(ClientError) as refused:
            await client.publish("elsewhere", 1)
        assert refused.value.code == "forbidden"


async def test_a_refused_token_ends_the_iteration(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_JWT_SECRET": "s" * 32})
    async with Client(gateway.ws_url, ["news"], token="not-a-jwt") as client:
        with pytest.raises(ClientError) as refused:
            await next_event(aiter(client))
    assert refused.value.code == "http_401"


async def test_close_ends_an_iteration_in_progress(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({})
    client = Client(gateway.ws_url, ["news"])
    client.start()
    await client.connected.wait()
    events: list[Event] = []

    async def consume() -> None:
        async for event in client:
            events.append(event)

    consumer = asyncio.create_task(consume())
    # One turn of the loop: the consumer's first step runs until it waits for an event.
    await asyncio.sleep(0)
    assert not consumer.done()
    await client.close()
    await asyncio.wait_for(consumer, 5)  # ended, not stuck
    assert events == []
    with pytest.raises(ConnectionError):
        await client.publish("news", 1)
