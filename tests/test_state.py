"""State channels: a subscriber gets the channel's latest message right after ``subscribed``,
then every live one, on every backplane; a storm of subscribers costs one read of Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from gateway.client import Client, Message, Resync
from gateway.history import Page, latest
from tests.faults import TcpProxy
from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RedisClusterServers,
    RedisServer,
    client,
    expect_silence,
    recv_json,
    request,
    subscribe,
)

STATE = {
    "GATEWAY_STATE_CHANNELS": "s.*",
    "GATEWAY_HISTORY_CHANNELS": "h.*",
    "GATEWAY_ANONYMOUS_PUBLISH": "*",
}

# The rule, without sockets


@pytest.mark.parametrize(
    ("page", "since", "recovered", "replayed"),
    [
        (Page("e", 3, [(3, "c")]), None, False, ["c"]),  # (recovered unused without since)
        (Page("e", 3, [(3, "c")]), (3, "e"), True, []),  # it has the latest already
        (Page("e", 3, [(3, "c")]), (1, "e"), True, ["c"]),  # behind: only the latest
        (Page("e", 3, [(3, "c")]), (0, "0"), True, ["c"]),  # nothing seen yet
        (Page("e", 3, [(3, "c")]), (2, "old"), False, ["c"]),  # another history: lost
        (Page("e", 3, [(3, "c")]), (9, "e"), False, ["c"]),  # a position from the future
        (Page("e", 3, []), (1, "e"), False, []),  # its latest is no longer kept
        (Page(None, 0, []), (0, "0"), True, []),  # no message yet, none seen
        (Page(None, 0, []), None, False, []),
        (Page("e", 4, [(3, "c")]), None, False, []),  # a page that does not reach the top
    ],
)
def test_latest(
    page: Page[str], since: tuple[int, str] | None, recovered: bool, replayed: list[str]
) -> None:
    recovery = latest(page, since)
    assert recovery.recovered is recovered
    assert [item for _, item in recovery.replay] == replayed
    assert (recovery.position, recovery.epoch) == (page.top, page.epoch or "0")


# Real gateways


async def _publish(ws: ClientConnection, channel: str, *values: Any) -> None:
    for value in values:
        reply = await request(ws, {"op": "publish", "channel": channel, "data": value, "id": 1})
        assert reply["op"] == "published", reply


@pytest.fixture(params=["memory", "redis", "cluster"])
def state_gateway(request: pytest.FixtureRequest, gateway_factory: GatewayFactory) -> Any:
    env = dict(STATE)
    if request.param == "redis":
        env["GATEWAY_REDIS_URL"] = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("cluster")
        env["GATEWAY_REDIS_URL"] = cluster.url
    return gateway_factory(env)


async def test_a_late_subscriber_gets_the_latest_value_then_live_ones_without_gap_or_duplicate(
    state_gateway: GatewayProcess,
) -> None:
    async with client(state_gateway.ws_url) as publisher:
        await _publish(publisher, "s.price", 1.0, 1.5, 2.0)
        async with client(state_gateway.ws_url) as late:
            reply = await subscribe(late, "s.price")
            assert (reply["offset"], reply["latest"]) == (3, True), reply
            first = await recv_json(late)
            assert (first["data"], first["offset"], first["epoch"]) == (2.0, 3, reply["epoch"])
            await _publish(publisher, "s.price", 2.5, 3.0)
            live = [await recv_json(late) for _ in range(2)]
            assert [(m["data"], m["offset"]) for m in live] == [(2.5, 4), (3.0, 5)]
            # One more, now that the replica has delivered live messages: from its memory.
            async with client(state_gateway.ws_url) as later:
                reply = await subscribe(later, "s.price")
                assert (reply["offset"], reply["latest"]) == (5, True)
                assert (await recv_json(later))["data"] == 3.0
                await _publish(publisher, "s.price", 3.5)
                assert (await recv_json(later))["offset"] == 6
                await expect_silence(later)
            assert (await recv_json(late))["offset"] == 6
            await expect_silence(late)
    # A channel with no message yet: nothing follows; the first one comes live.
    async with client(state_gateway.ws_url) as fresh:
        reply = await subscribe(fresh, "s.empty")
        assert (reply["offset"], reply["epoch"], "latest" in reply) == (0, "0", False)
        await expect_silence(fresh)


async def test_options_and_their_errors(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(STATE)
    async with client(gateway.ws_url) as ws:
        await _publish(ws, "s.doc", "a", "b")
        await _publish(ws, "h.log", "x", "y")
        await _publish(ws, "plain", "p")
        # Resuming a state channel: only the latest, whatever was missed.
        reply = await subscribe(ws, "s.doc", since={"offset": 0, "epoch": "0"})
        assert (reply["recovered"], reply["latest"], reply["offset"]) == (True, True, 2)
        assert (await recv_json(ws))["data"] == "b"
        await request(ws, {"op": "unsubscribe", "channel": "s.doc", "id": 1})
        reply = await subscribe(ws, "s.doc", since={"offset": 2, "epoch": reply["epoch"]})
        assert (reply["recovered"], "latest" in reply) == (True, False)  # it has it already
        await request(ws, {"op": "unsubscribe", "channel": "s.doc", "id": 1})
        reply = await subscribe(ws, "s.doc", since={"offset": 1, "epoch": "gone"})
        assert (reply["recovered"], reply["latest"]) == (False, True)  # another history
        assert (await recv_json(ws))["data"] == "b"
        await request(ws, {"op": "unsubscribe", "channel": "s.doc", "id": 1})
        # Asked for on a history channel; declined on a state channel; meaningless on a plain.
        reply = await subscribe(ws, "h.log", latest=True)
        assert (reply["offset"], reply["latest"]) == (2, True)
        assert (await recv_json(ws))["data"] == "y"
        reply = await subscribe(ws, "s.doc", latest=False)
        assert (reply["offset"], "latest" in reply) == (2, False)
        reply = await subscribe(ws, "plain", latest=True)
        assert set(reply) == {"op", "channel", "id"}
        await expect_silence(ws)
        # Bad options: documented errors, the connection stays.
        for options, words in (
            ({"latest": "yes"}, "Expected `bool | null`"),
            ({"lates": True}, "unknown field `lates`"),
        ):
            payload = json.dumps({"op": "subscribe", "channel": "s.x", "id": 3, **options})
            error = await request(ws, payload)
            assert (error["op"], error["code"], error["id"]) == ("error", "bad_request", 3)
            assert words in error["message"], error
        assert (await request(ws, {"op": "ping", "id": 4}))["op"] == "pong"


async def test_a_thousand_subscribers_arriving_together_cost_one_read(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**STATE, "GATEWAY_REDIS_URL": redis_server.url})
    async with client(gateway.ws_url) as publisher:
        await _publish(publisher, "s.board", {"score": 1}, {"score": 2})

        def reads() -> int:
            """History reads run so far: each runs one XREVRANGE (publisher/lua/)."""
            stats = redis_server.command("INFO", "commandstats")
            line = [x for x in stats.splitlines() if x.startswith("cmdstat_xrevrange:")]
            return int(line[0].split("calls=")[1].split(",")[0]) if line else 0

        before = reads()
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(client(gateway.ws_url)) for _ in range(1000)]
            replies = await asyncio.gather(*(subscribe(ws, "s.board") for ws in sockets))
            firsts = await asyncio.gather(*(recv_json(ws) for ws in sockets))
            assert reads() - before == 1  # the first one read; the others had it in memory
            assert {(r["offset"], r["latest"]) for r in replies} == {(2, True)}
            assert {json.dumps(m["data"]) for m in firsts} == {'{"score": 2}'}
            await _publish(publisher, "s.board", {"score": 3})
            lives = await asyncio.gather(*(recv_json(ws) for ws in sockets))
            assert {m["offset"] for m in lives} == {3}
    assert gateway.metric("wsgateway_history_total", event="latest") == 1000


async def test_the_python_client_yields_the_state_then_updates_and_resumes_quietly(
    gateway_factory: GatewayFactory,
) -> None:
    """A reconnect that missed two updates yields only the latest, with no Resync: a state
    channel's subscriber wants the state, not the log."""
    gateway = gateway_factory(STATE)
    proxy = TcpProxy(gateway.port).start()
    try:
        async with client(gateway.ws_url) as publisher:
            await _publish(publisher, "s.score", 1, 2)
            events: list[Any] = []
            url = f"ws://127.0.0.1:{proxy.port}/ws"
            async with Client(url, ["s.score"], backoff_max=0.2) as state:
                iterator = aiter(state)
                events.append(await anext(iterator))
                await _publish(publisher, "s.score", 3)
                events.append(await anext(iterator))
                proxy.freeze()  # what is sent now never arrives
                await _publish(publisher, "s.score", 4, 5)
                proxy.cut()  # the client reconnects and resumes
                events.append(await anext(iterator))
                assert state.connects == 2
    finally:
        proxy.stop()
    assert [(e.data, e.offset) for e in events if isinstance(e, Message)] == [
        (2, 2),
        (3, 3),
        (5, 5),
    ]
    assert not any(isinstance(e, Resync) for e in events)
