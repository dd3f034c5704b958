"""Coalesced writes, counted by a real gateway process in ``wsgateway_writes_total``.

Messages of one channel that arrive together (one Redis read) reach each client in one write,
in order, and so do those of several channels for a client of them all; with a fixed window, a
burst that follows a write waits for the window's end and goes out in one write too; adaptive
(the default) writes through while the replica has CPU to spare and holds messages while it is
busier than it allows; with coalescing off, every delivery is a write of its own. Clients
that resume into a busy coalesced history channel, or catch up with it after a gap, get every
message after their position once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis
from websockets.asyncio.client import ClientConnection

from publisher import Publisher
from publisher.envelope import build_envelope
from publisher.history import APPEND_LUA, HistoryPolicy, history_keys
from tests.harness import (
    GatewayFactory,
    RedisServer,
    client,
    envelope,
    expect_silence,
    recv_json,
    resume,
    subscribe,
    wait_until,
)

WRITES = "wsgateway_writes_total"
DELIVERIES = "wsgateway_deliveries_total"
WINDOW = "wsgateway_coalescing_window_seconds"


async def recv_n(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [await recv_json(ws) for _ in range(count)]


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
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_COALESCE": "off"})
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
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_COALESCE": "window",
            "GATEWAY_COALESCE_WINDOW": str(window),
        }
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


async def test_adaptive_writes_through_while_the_replica_has_cpu_to_spare(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Messages 10 ms apart to one client: a fixed 20 ms window would hold most of them;
    the default (adaptive) sees an idle core and writes each as it comes."""
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url})
    async with client(gateway.ws_url + "?channels=feed") as ws:
        await recv_json(ws)
        writes = gateway.metric(WRITES)
        for n in range(20):
            redis_server.publish("ws:feed", envelope("feed", n, mid=f"m{n}"))
            await asyncio.sleep(0.01)
        assert [(await recv_json(ws))["data"] for _ in range(20)] == list(range(20))
        assert gateway.metric(WRITES) - writes == 20
        assert gateway.metric(WINDOW) == 0


async def test_adaptive_holds_messages_while_the_replica_is_busier_than_it_allows(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """With ``GATEWAY_COALESCE_BUSY`` at 5% of a core, a feed of 400 messages a second to
    30 clients makes the replica busy: the window opens, writes get fewer than deliveries,
    nothing is lost or reordered; when the feed stops the window closes again."""
    gateway = gateway_factory(
        {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_COALESCE_BUSY": "0.05"}
    )
    messages, subscribers = 800, 30
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(client(gateway.ws_url + "?channels=feed"))
            for _ in range(subscribers)
        ]
        for ws in clients:
            await recv_json(ws)
        # The handshakes' load is forgotten (scraping the metrics slowly: it costs CPU too).
        wait_until(lambda: gateway.metric(WINDOW) == 0, interval=0.5)
        received = asyncio.gather(*[asyncio.wait_for(recv_n(ws, messages), 30) for ws in clients])
        writes, deliveries, opened = gateway.metric(WRITES), gateway.metric(DELIVERIES), 0.0
        for n in range(messages):  # two seconds
            redis_server.publish("ws:feed", envelope("feed", n, mid=f"m{n}"))
            if n % 100 == 99:
                opened = max(opened, gateway.metric(WINDOW))
            await asyncio.sleep(0.0025)
        for frames in await received:
            assert [frame["data"] for frame in frames] == list(range(messages))
        assert opened > 0
        assert gateway.metric(DELIVERIES) - deliveries == messages * subscribers
        assert gateway.metric(WRITES) - writes < messages * subscribers * 0.8
        wait_until(lambda: gateway.metric(WINDOW) == 0, interval=0.5)


async def test_a_client_of_several_channels_gets_what_arrives_together_in_one_write(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """A dashboard on three channels: one message on each in one Redis read is one write
    to it (not three), and one to the client of only one of them."""
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url})
    async with (
        client(gateway.ws_url + "?channels=a,b,c") as dashboard,
        client(gateway.ws_url + "?channels=a") as single,
    ):
        for _ in range(3):
            assert (await recv_json(dashboard))["op"] == "subscribed"
        await recv_json(single)
        writes = gateway.metric(WRITES)
        rounds = 10
        for n in range(rounds):
            redis_server.pipeline(
                [("PUBLISH", f"ws:{c}", envelope(c, n, mid=f"{c}{n}")) for c in "abc"]
            )
            got = [await recv_json(dashboard) for _ in range(3)]
            assert sorted((m["channel"], m["data"]) for m in got) == [(c, n) for c in "abc"]
            assert (await recv_json(single))["data"] == n
        # Two writes a round (three and one if each channel were written on its own), a few
        # more at most if Redis split a round's output over two reads.
        assert gateway.metric(WRITES) - writes <= 2 * rounds + 3


#: A replica holding the messages of history channels h.* a fixed 40 ms: with a message
#: about every 5 ms, several go out in each write.
BUSY_HISTORY = {
    "GATEWAY_HISTORY_CHANNELS": "h.*",
    "GATEWAY_COALESCE": "window",
    "GATEWAY_COALESCE_WINDOW": "0.04",
}


async def subscribers_of_feed(
    stack: contextlib.AsyncExitStack, url: str, expected: int, subscribers: int = 80
) -> tuple[str, asyncio.Future[list[list[dict[str, Any]]]]]:
    """``subscribers`` clients of h.feed, subscribed: the channel's epoch, and their next
    ``expected`` messages each, as they come."""
    clients = [
        await stack.enter_async_context(client(url + "?channels=h.feed"))
        for _ in range(subscribers)
    ]
    epoch = (await recv_json(clients[0]))["epoch"]
    for ws in clients[1:]:
        await recv_json(ws)
    return epoch, asyncio.gather(*[asyncio.wait_for(recv_n(ws, expected), 30) for ws in clients])


async def test_resuming_into_a_busy_coalesced_channel_misses_nothing_and_repeats_nothing(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """A history channel's 80 subscribers, several messages a write (a fixed 40 ms window, a
    message about every 5 ms), while clients resume from earlier positions one after another:
    each ends with exactly the messages after its position, and the 80 with all of them, in
    order (a resumed client joins the others only after they have been written what the
    channel holds)."""
    gateway = gateway_factory({**BUSY_HISTORY, "GATEWAY_REDIS_URL": redis_server.url})
    total = 300
    with Publisher(redis_server.url, history=HistoryPolicy(("h.*",))) as publisher:
        for n in range(1, 51):
            publisher.publish("h.feed", n)
        async with contextlib.AsyncExitStack() as stack:
            epoch, received = await subscribers_of_feed(stack, gateway.ws_url, total - 50)

            async def offsets_after(since: int) -> list[int]:
                messages = await resume(gateway.ws_url, "h.feed", since, epoch, total)
                return [message["offset"] for message in messages]

            resumed: list[asyncio.Task[list[int]]] = []
            starts = [(7 * k) % 50 for k in range(24)]
            for n in range(51, total + 1):
                await asyncio.to_thread(publisher.publish, "h.feed", n)
                if n % 10 == 0 and starts[len(resumed) :]:
                    resumed.append(asyncio.create_task(offsets_after(starts[len(resumed)])))
                await asyncio.sleep(0.005)
            for since, offsets in zip(starts, await asyncio.gather(*resumed), strict=True):
                assert offsets == list(range(since + 1, total + 1))
            for frames in await received:
                assert [frame["data"] for frame in frames] == list(range(51, total + 1))


async def test_clients_catching_up_join_a_busy_coalesced_channel_without_repeats(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Three messages reach the channel's stream but not the replica (sent with SPUBLISH,
    which SUBSCRIBE misses) just before four clients resume: their read is ahead of the live
    messages, so they take only those after their position until the replica, having filled
    the gap, catches up with them; then they join the 80 subscribers, which get several
    messages a write. Each gets every message after its position once, and the 80 all of
    them, in order."""
    gateway = gateway_factory({**BUSY_HISTORY, "GATEWAY_REDIS_URL": redis_server.url})
    total, hidden = 200, (101, 102, 103)
    policy = HistoryPolicy(("h.*",))
    script = redis.Redis.from_url(redis_server.url).register_script(APPEND_LUA)
    with Publisher(redis_server.url, history=policy) as publisher:
        publisher.publish("h.feed", 1)
        async with contextlib.AsyncExitStack() as stack:
            epoch, received = await subscribers_of_feed(stack, gateway.ws_url, total - 1)
            late = [await stack.enter_async_context(client(gateway.ws_url)) for _ in range(4)]
            for n in range(2, total + 1):
                if n in hidden:
                    args = policy.append_args(
                        "ws:h.feed", build_envelope("h.feed", n), sharded=True
                    )
                    script(list(history_keys("ws:", "h.feed")), args)
                else:
                    await asyncio.to_thread(publisher.publish, "h.feed", n)
                for ws in late if n == hidden[-1] else ():
                    reply = await subscribe(ws, "h.feed", {"offset": 50, "epoch": epoch})
                    assert reply["recovered"] is True and reply["offset"] == n, reply
                await asyncio.sleep(0.005)
            for ws in late:
                offsets = [(await recv_json(ws))["offset"] for _ in range(total - 50)]
                assert offsets == list(range(51, total + 1))
                await expect_silence(ws, 0.2)
            for frames in await received:
                assert [frame["data"] for frame in frames] == list(range(2, total + 1))
