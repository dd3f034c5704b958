"""Fan-out through a real Redis to two real replicas, published by wspublish and by hand."""

from __future__ import annotations

import json

from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RedisServer,
    async_wait_until,
    client,
    envelope,
    expect_silence,
    recv_json,
    request,
    wspublish,
)


async def test_wspublish_reaches_subscribers_on_both_replicas_and_no_one_else(
    redis_server: RedisServer, redis_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    one, two = redis_gateways
    async with (
        client(one.ws_url + "?channels=news") as a,
        client(two.ws_url + "?channels=news") as b,
        client(two.ws_url + "?channels=sports") as c,
        client(one.ws_url) as d,
    ):
        for ws in (a, b, c):
            assert (await recv_json(ws))["op"] == "subscribed"
        result = wspublish("--redis-url", redis_server.url, "news", '{"headline": "hi", "n": 1.50}')
        assert result.returncode == 0, result.stderr
        assert "reached 2 gateway(s)" in result.stdout
        for ws in (a, b):
            got = await recv_json(ws)
            assert (got["op"], got["channel"], got["data"]) == (
                "message",
                "news",
                {"headline": "hi", "n": 1.5},
            )
        await expect_silence(c)
        await expect_silence(d)


async def test_hand_written_envelope_is_delivered_byte_for_byte(
    redis_server: RedisServer, redis_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    one, _ = redis_gateways
    async with client(one.ws_url + "?channels=prices.eur") as ws:
        await recv_json(ws)
        raw = (
            b'{"v":1,"channel":"prices.eur","data":{"bid": 1.10, "ask":1.1e0,"big":'
            b'123456789012345678901234567890},"mid":"x-1","ts":1700000000000}'
        )
        assert redis_server.publish("ws:prices.eur", raw) == 1
        frame = await ws.recv()
        assert frame == (
            '{"op":"message","channel":"prices.eur","data":{"bid": 1.10, "ask":1.1e0,"big":'
            '123456789012345678901234567890},"mid":"x-1","ts":1700000000000}'
        )


async def test_unsubscribe_stops_delivery_and_the_last_one_out_unsubscribes_redis(
    redis_server: RedisServer, redis_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    one, two = redis_gateways
    async with (
        client(one.ws_url + "?channels=news") as a,
        client(one.ws_url + "?channels=news") as b,
        client(two.ws_url + "?channels=news") as c,
    ):
        for ws in (a, b, c):
            await recv_json(ws)
        assert redis_server.pubsub_channels() == {"ws:news"}
        assert redis_server.command("PUBSUB", "NUMSUB", "ws:news") == ["ws:news", 2]

        await request(a, {"op": "unsubscribe", "channel": "news"})
        # b still wants it on replica one: that replica stays subscribed.
        assert redis_server.command("PUBSUB", "NUMSUB", "ws:news") == ["ws:news", 2]
        assert redis_server.publish("ws:news", envelope("news", 1)) == 2
        assert (await recv_json(b))["data"] == 1
        assert (await recv_json(c))["data"] == 1
        await expect_silence(a)

        await request(b, {"op": "unsubscribe", "channel": "news"})
        await async_wait_until(
            lambda: redis_server.command("PUBSUB", "NUMSUB", "ws:news") == ["ws:news", 1]
        )
        assert redis_server.publish("ws:news", envelope("news", 2)) == 1
        assert (await recv_json(c))["data"] == 2
        await expect_silence(b)
    # Disconnecting is leaving too.
    await async_wait_until(lambda: redis_server.pubsub_channels() == set())


async def test_subscriptions_are_shared_not_per_client(
    redis_server: RedisServer, redis_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    one, _ = redis_gateways
    clients = [client(one.ws_url + "?channels=news,sports") for _ in range(20)]
    sockets = [await c.__aenter__() for c in clients]
    try:
        for ws in sockets:
            await recv_json(ws)
            await recv_json(ws)
        assert redis_server.pubsub_channels() == {"ws:news", "ws:sports"}
        numsub = redis_server.command("PUBSUB", "NUMSUB", "ws:news", "ws:sports")
        assert numsub == ["ws:news", 1, "ws:sports", 1]
        assert redis_server.command("PUBSUB", "NUMPAT") == 0
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


async def test_malformed_envelopes_are_counted_dropped_and_survived(
    redis_server: RedisServer, redis_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    one, _ = redis_gateways
    async with client(one.ws_url + "?channels=news") as ws:
        await recv_json(ws)
        garbage = [
            b"",
            b"\xff\xfe\x00",
            b"not json",
            b"[]",
            b"{}",
            b'{"v":1}',
            json.dumps({"v": 2, "channel": "news", "data": 1, "mid": "m", "ts": 1}).encode(),
            envelope("sports", 1),  # names another channel than it arrived on
            b'{"v":1,"channel":"news","data":"\xc3","mid":"m","ts":1}',
            b"x" * 100_000,
            # What the decoder cannot handle: nesting too deep, a size over the limit.
            b'{"v":1,"channel":"news","data":' + b"[" * 5000 + b"]" * 5000 + b',"mid":"m","ts":1}',
            envelope("news", "x" * (2 * 1024 * 1024)),
        ]
        for payload in garbage:
            redis_server.publish("ws:news", payload)
        redis_server.publish("ws:news", envelope("news", "after the garbage"))
        assert (await recv_json(ws))["data"] == "after the garbage"
        await expect_silence(ws)
    assert one.running
    counted = {
        reason: one.metric("wsgateway_messages_malformed_total", reason=reason)
        for reason in ("json", "encoding", "schema", "channel", "depth", "size")
    }
    assert counted == {
        "json": 3,
        "encoding": 2,
        "schema": 4,
        "channel": 1,
        "depth": 1,
        "size": 1,
    }
    logs = one.logs()
    assert "Traceback" not in logs
    # One line a second at most, whatever the flood: 12 arrived within about a second.
    assert 1 <= logs.count("malformed envelope") <= 3


async def test_messages_arrive_in_publish_order(
    redis_server: RedisServer, redis_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    one, two = redis_gateways
    async with client(one.ws_url + "?channels=seq") as a, client(two.ws_url + "?channels=seq") as b:
        await recv_json(a)
        await recv_json(b)
        lines = "".join(f"{n}\n" for n in range(500))
        result = wspublish("--redis-url", redis_server.url, "seq", "--stdin", stdin=lines)
        assert result.returncode == 0, result.stderr
        for ws in (a, b):
            got = [(await recv_json(ws))["data"] for _ in range(500)]
            assert got == list(range(500))


async def test_readiness_follows_the_backplane(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
) -> None:
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url})
    assert gateway.http("/readyz") == (200, "ready\n")
    redis_server.kill()
    await async_wait_until(lambda: gateway.http("/readyz")[0] == 503)
    assert gateway.http("/readyz") == (503, "redis backplane disconnected\n")
    assert gateway.http("/healthz") == (200, "ok\n")  # liveness never depends on Redis
    async with client(gateway.ws_url) as ws:
        reply = await request(ws, {"op": "subscribe", "channel": "news", "id": 1})
        assert (reply["op"], reply["code"], reply["id"]) == ("error", "unavailable", 1)
    redis_server.start()
    await async_wait_until(lambda: gateway.http("/readyz")[0] == 200, timeout=20)
    async with client(gateway.ws_url) as ws:  # ready again means subscribing works again
        reply = await request(ws, {"op": "subscribe", "channel": "news", "id": 2})
        assert (reply["op"], reply["id"]) == ("subscribed", 2)


async def test_compression_when_turned_on(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory(
        {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_COMPRESSION": "deflate"}
    )
    async with (
        client(gateway.ws_url + "?channels=news", compression="deflate") as deflating,
        client(gateway.ws_url + "?channels=news", compression=None) as plain,
    ):
        for ws in (deflating, plain):
            await recv_json(ws)
        assert deflating.protocol.extensions  # negotiated
        assert not plain.protocol.extensions
        for n in range(50):
            redis_server.publish("ws:news", envelope("news", {"n": n, "text": "abc" * 100}))
        for ws in (deflating, plain):
            assert [(await recv_json(ws))["data"]["n"] for _ in range(50)] == list(range(50))


async def test_the_channel_prefix_names_the_redis_channels(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Two applications share one Redis: each replica hears its own prefix only."""
    gateway = gateway_factory(
        {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_CHANNEL_PREFIX": "app1:"}
    )
    async with client(gateway.ws_url + "?channels=news") as ws:
        await recv_json(ws)
        assert redis_server.pubsub_channels() == {"app1:news"}
        assert redis_server.publish("ws:news", envelope("news", "other app")) == 0
        assert redis_server.publish("app1:news", envelope("news", "ours")) == 1
        assert (await recv_json(ws))["data"] == "ours"
        await expect_silence(ws)
