"""Coalesced writes, counted by a real gateway process in ``wsgateway_writes_total``.

Messages of one channel that arrive together (one Redis read) reach each client in one write,
in order; with a coalescing window, a burst that follows a write waits for the window's end and
goes out in one write too; with coalescing off, every delivery is a write of its own.
"""

from __future__ import annotations

import time

from tests.harness import GatewayFactory, RedisServer, client, envelope, recv_json

WRITES = "wsgateway_writes_total"
DELIVERIES = "wsgateway_deliveries_total"


def burst(redis_server: RedisServer, first: int, count: int) -> None:
    """``count`` messages on channel "feed" in one round trip: Redis sends them back to back."""
    redis_server.pipeline(
        [
            ("PUBLISH", "ws:feed", envelope("feed", n, mid=f"m{n}"))
            for n in range(first, first + count)
        ]
    )


async def test_messages_that_arrive_together_go_out_in_one_write_per_client(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url})
    async with (
        client(gateway.ws_url + "?channels=feed") as a,
        client(gateway.ws_url + "?channels=feed") as b,
    ):
        await recv_json(a)
        await recv_json(b)
        writes, deliveries = gateway.metric(WRITES), gateway.metric(DELIVERIES)
        burst(redis_server, 0, 50)
        for ws in (a, b):
            assert [(await recv_json(ws))["data"] for _ in range(50)] == list(range(50))
        assert gateway.metric(DELIVERIES) - deliveries == 100
        # One Redis read normally holds all 50; a few reads at most if Redis split its output.
        assert gateway.metric(WRITES) - writes <= 2 * 5


async def test_with_coalescing_off_every_delivery_is_a_write(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_COALESCE": "false"})
    async with client(gateway.ws_url + "?channels=feed") as ws:
        await recv_json(ws)
        writes = gateway.metric(WRITES)
        burst(redis_server, 0, 20)
        assert [(await recv_json(ws))["data"] for _ in range(20)] == list(range(20))
        assert gateway.metric(WRITES) - writes == 20


async def test_a_window_sends_the_first_message_at_once_and_holds_what_follows(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    window = 1.0
    gateway = gateway_factory(
        {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_COALESCE_WINDOW": str(window)}
    )
    async with client(gateway.ws_url + "?channels=feed") as ws:
        await recv_json(ws)
        writes = gateway.metric(WRITES)
        started = time.monotonic()
        redis_server.publish("ws:feed", envelope("feed", 0))
        assert (await recv_json(ws))["data"] == 0
        assert time.monotonic() - started < window / 2  # not held: nothing was written lately
        for n in range(1, 6):  # five separate publishes, each its own Redis message
            redis_server.publish("ws:feed", envelope("feed", n, mid=f"m{n}"))
        assert [(await recv_json(ws))["data"] for _ in range(5)] == [1, 2, 3, 4, 5]
        assert gateway.metric(WRITES) - writes == 2
