"""Control requests from services: disconnect a user, put them on a channel or take them off,
on every replica, each acknowledged with the connections it reached.

The request format is tested pure; the rest against real Redis (one node and the cluster
harness) and real replicas, through the publisher library (sync and async) and ``wspublish``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from websockets.exceptions import ConnectionClosed

from gateway.access import Access, personal_channel
from publisher import AsyncPublisher, Publisher
from publisher.control import (
    CONTROL_CHANNEL,
    MAX_REQUEST_BYTES,
    ControlError,
    ControlResult,
    RefusedControl,
    Tally,
    build_control,
    parse_control,
)
from publisher.schema import control_schema
from tests.harness import (
    GatewayFactory,
    RedisClusterServers,
    RedisServer,
    async_wait_until,
    client,
    expect_silence,
    recv_json,
    request,
    rss_kib,
    wait_until,
    wspublish,
)
from tests.test_redis_outages import FAST_RECOVERY
from tests.test_security import SECRET, token

# The request format, pure


@pytest.mark.parametrize(
    ("fields", "encoded"),
    [
        ({"op": "disconnect", "user": "alice"}, {"v": 1, "op": "disconnect", "user": "alice"}),
        (
            {"op": "disconnect", "user": "a", "code": 4003, "reason": "logged out"},
            {"v": 1, "op": "disconnect", "user": "a", "code": 4003, "reason": "logged out"},
        ),
        (
            {"op": "subscribe", "user": "a", "channel": "room.{7}", "request_id": "r1"},
            {"v": 1, "op": "subscribe", "user": "a", "channel": "room.{7}", "id": "r1"},
        ),
        (
            {"op": "unsubscribe", "user": "@x", "channel": "@x"},
            {"v": 1, "op": "unsubscribe", "user": "@x", "channel": "@x"},
        ),
    ],
)
def test_a_request_is_encoded_with_what_differs_from_the_defaults(
    fields: dict[str, Any], encoded: dict[str, Any]
) -> None:
    payload = build_control(**fields)
    assert json.loads(payload) == encoded
    assert parse_control(payload).user == fields["user"]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"op": "kick", "user": "a"}, "op"),
        ({"op": "disconnect", "user": ""}, "user"),
        ({"op": "disconnect", "user": "u" * 257}, "user"),
        ({"op": "disconnect", "user": "a", "code": 1006}, "code"),
        ({"op": "disconnect", "user": "a", "code": 5000}, "code"),
        ({"op": "disconnect", "user": "a", "reason": "é" * 124}, "123"),
        ({"op": "subscribe", "user": "a"}, "needs a channel"),
        ({"op": "unsubscribe", "user": "a", "channel": "no spaces"}, "channel"),
        ({"op": "subscribe", "user": "a", "channel": CONTROL_CHANNEL}, "@@"),
        ({"op": "disconnect", "user": "a", "request_id": "has space"}, "id"),
    ],
)
def test_a_bad_request_is_refused_before_it_reaches_redis(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(ControlError, match=why):
        build_control(**fields)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"v":2,"op":"disconnect","user":"a"}',
        b'{"v":true,"op":"disconnect","user":"a"}',
        b'{"v":1,"op":"disconnect","user":"a","code":"4000"}',
        b'{"v":1,"op":"disconnect","user":7}',
    ],
)
def test_the_replicas_reader_refuses_what_the_builder_would(payload: bytes) -> None:
    with pytest.raises(RefusedControl):
        parse_control(payload)


SCHEMA_FILE = Path(__file__).parent.parent / "docs" / "control.schema.json"


def test_the_committed_json_schema_is_current() -> None:
    assert SCHEMA_FILE.read_text() == control_schema(), (
        "docs/control.schema.json is stale: "
        "python -m publisher.schema control > docs/control.schema.json"
    )


@pytest.mark.parametrize(
    ("request_", "valid"),
    [
        ({"v": 1, "op": "disconnect", "user": "a"}, True),
        ({"v": 1, "op": "subscribe", "user": "a", "channel": "r", "future": 1}, True),
        ({"v": 1, "op": "kick", "user": "a"}, False),
        ({"v": 1, "op": "disconnect", "user": ""}, False),
        ({"v": 1, "op": "disconnect", "user": "a", "code": "4000"}, False),
        ({"v": 1, "op": "disconnect", "user": "a", "id": "a b"}, False),
        # Each of these the schema accepted and the replicas dropped, unacknowledged:
        ({"v": 1, "op": "disconnect", "user": "a", "code": 999}, False),
        ({"v": 1, "op": "subscribe", "user": "a", "channel": "r", "code": 999}, False),
        ({"v": 1, "op": "disconnect", "user": "a", "reason": "x" * 124}, False),
        ({"v": 1, "op": "subscribe", "user": "a", "channel": "@@control"}, False),
        ({"v": 1, "op": "subscribe", "user": "a"}, False),
        ({"v": 1, "op": "unsubscribe", "user": "a", "channel": None}, False),
        # ... and these both accept: a long UTF-8 reason is cut when the frame is made.
        ({"v": 1, "op": "disconnect", "user": "a", "reason": "é" * 123}, True),
        ({"v": 1.0, "op": "disconnect", "user": "a", "code": 3000.0}, True),
        ({"v": 1, "op": "disconnect", "user": "a", "channel": "r"}, True),
    ],
)
def test_the_schema_says_what_the_replicas_read(request_: dict[str, Any], valid: bool) -> None:
    """What another language's publisher would check against the schema, the replicas
    accept or refuse alike."""
    assert schema_accepts(request_) == reader_accepts(json.dumps(request_)) == valid


def schema_accepts(request_: Any) -> bool:
    return bool(Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).is_valid(request_))


def reader_accepts(payload: str | bytes) -> bool:
    try:
        parse_control(payload)
    except RefusedControl:
        return False
    return True


_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 6000),
    st.sampled_from([1.0, 1008.0, 3000.5, 1e3]),
    st.text(max_size=5),
    st.sampled_from(["disconnect", "subscribe", "unsubscribe", "room.9", "@@x", "a b", "é" * 124]),
    st.sampled_from(
        ["x" * 123, "x" * 124, "u" * 256, "u" * 257, "00-" + "a" * 32 + "-" + "b" * 16 + "-01"]
    ),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=600, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["v", "op", "user", "channel", "code", "reason", "id", "traceparent", "tracestate", "x"]
        ),
        _value,
    ),
    st.sampled_from([None, "disconnect", "subscribe", "unsubscribe"]),
)
def test_the_schema_and_the_replicas_agree_on_any_request(
    fields: dict[str, Any], op: str | None
) -> None:
    """Requests of every shape, valid and not: whatever the schema accepts the replicas act
    on, and whatever it refuses they refuse (and acknowledge with the reason)."""
    request_ = {"v": 1, "user": "alice", **({"op": op} if op else {}), **fields}
    assert schema_accepts(request_) == reader_accepts(json.dumps(request_)), request_


def test_every_request_of_the_schema_s_fields_fits_however_escaped() -> None:
    """MAX_REQUEST_BYTES refuses only what unknown fields make large: a request with every
    field at its longest, each character a surrogate pair written as two \\u escapes."""
    emoji = "\U0001f600"
    request_ = {
        "v": 1,
        "op": "disconnect",
        "user": emoji * 256,
        "reason": emoji * 123,
        "code": 4999,
        "id": "\\" * 128,
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "tracestate": emoji * 512,
    }
    payload = json.dumps(request_, ensure_ascii=True).encode()
    assert len(payload) <= MAX_REQUEST_BYTES, len(payload)
    assert parse_control(payload).user == emoji * 256


@pytest.mark.parametrize(
    ("payload", "request_id", "why"),
    [
        (b'{"v":1,"op":"disconnect","user":"a","id":"r1","op":"kick"}', "r1", "'op' given twice"),
        (b'{"v":1,"op":"disconnect","user":"a","id":"r1","id":"r2"}', None, "'id' given twice"),
        (b'{"v":1,"op":"subscribe","user":"a","id":"r3"}', "r3", "needs a channel"),
        (b'{"v":1,"op":"disconnect","user":"a","id":"r4","code":999}', "r4", "code"),
        (b'{"v":1,"op":"disconnect","user":"a","id":"has space"}', None, "id"),
        (
            b'{"v":1,"op":"disconnect","user":"a","id":"r5","x":' + b"[" * 300 + b"]" * 300 + b"}",
            "r5",
            "recursion",
        ),
        (
            b'{"v":1,"op":"disconnect","user":"a","id":"r6","x":'
            + b"[" * 4000
            + b"]" * 4000
            + b"}",
            None,
            "nested too deeply",
        ),
        (
            b'{"v":1,"op":"disconnect","user":"a","id":"r7","x":"' + b"x" * 16400 + b'"}',
            None,
            "over 16384 bytes",
        ),
    ],
)
def test_a_refused_request_says_why_and_which_it_was_when_its_id_can_be_read(
    payload: bytes, request_id: str | None, why: str
) -> None:
    with pytest.raises(RefusedControl, match=why) as refused:
        parse_control(payload)
    assert refused.value.request_id == request_id


def test_acknowledgements_add_up() -> None:
    tally = Tally()
    for connections in (2, 0, 1):
        tally.add(json.dumps({"replica": "r", "connections": connections}).encode())
    assert tally.result(4) == ControlResult(replicas=4, acknowledged=3, connections=3)
    assert not tally.result(4).complete and tally.result(3).complete
    # Whatever else lands on the list (no replica writes it) counts, with why.
    tally.add(b'{"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}")
    assert tally.result(4).errors[0].startswith("unreadable acknowledgement")


def test_reserved_channels_are_nobody_s() -> None:
    everything = Access(subscribe=("*",), publish=("*",), granted=frozenset({"@@control"}))
    assert not everything.can_subscribe("@@control")
    assert not everything.can_publish("@@control")
    assert not everything.placing("@@ack.1").can_subscribe("@@ack.1")
    # A sub starting with @ would make a reserved name of its personal channel.
    assert personal_channel("@control") is None
    assert personal_channel("alice") == "@alice"


# Against real replicas

ENV = {"GATEWAY_JWT_SECRET": SECRET}


def connect_as(gateway: Any, user: str, **claims: Any) -> Any:
    return client(f"{gateway.ws_url}?token={token(sub=user, **claims)}")


async def closed_with(ws: Any) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed) as caught:
        await recv_json(ws)
    received = caught.value.rcvd
    return (received.code, received.reason) if received is not None else (None, None)


async def test_disconnect_reaches_every_connection_of_the_user_on_every_replica(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    env = {**ENV, "GATEWAY_REDIS_URL": redis_server.url}
    replicas = [gateway_factory(env) for _ in range(3)]
    async with (
        connect_as(replicas[0], "alice") as a1,
        connect_as(replicas[0], "alice") as a2,
        connect_as(replicas[1], "alice") as a3,
        connect_as(replicas[2], "bob") as bob,
        AsyncPublisher(redis_server.url) as publisher,
    ):
        result = await publisher.disconnect("alice", code=4003, reason="logged out")
        assert result == ControlResult(replicas=3, acknowledged=3, connections=3)
        for ws in (a1, a2, a3):
            assert await closed_with(ws) == (4003, "logged out")
        assert await request(bob, {"op": "ping", "id": 1}) == {"op": "pong", "id": 1}
        # Nobody left to reach: every replica still answers, with none.
        assert await publisher.disconnect("alice") == ControlResult(3, 3, 0)
    wait_until(lambda: replicas[0].closed(4003) == 2)
    assert (
        replicas[0].metric(
            "wsgateway_connections_closed_total", websocket_close_code="4003", reason="control"
        )
        == 2
    )
    assert replicas[2].metric("wsgateway_control_requests_total", op="disconnect", result="ok") == 2
    # The acknowledgement lists are gone once read.
    assert redis_server.command("KEYS", "ws:@@ack.*") == []


async def test_a_service_puts_a_user_on_a_channel_and_takes_them_off(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    env = {**ENV, "GATEWAY_REDIS_URL": redis_server.url}
    first, second = gateway_factory(env), gateway_factory(env)
    async with (
        connect_as(first, "alice", channels=[]) as here,
        connect_as(second, "alice", channels=[]) as there,
    ):
        with Publisher(redis_server.url) as publisher:
            # The token does not allow room.9: the service does.
            assert publisher.subscribe("alice", "room.9") == ControlResult(2, 2, 2)
            for ws in (here, there):
                assert await recv_json(ws) == {"op": "subscribed", "channel": "room.9"}
            publisher.publish("room.9", "hello")
            for ws in (here, there):
                assert (await recv_json(ws))["data"] == "hello"
            # Already on it: nothing to do, and nothing sent.
            assert publisher.subscribe("alice", "room.9").connections == 0
            await expect_silence(here)
            # A refreshed token that still does not allow it keeps what the service placed.
            refreshed = await request(
                here, {"op": "refresh", "token": token(sub="alice", channels=[]), "id": 1}
            )
            assert refreshed["op"] == "refreshed"
            assert publisher.unsubscribe("alice", "room.9") == ControlResult(2, 2, 2)
            for ws in (here, there):
                assert await recv_json(ws) == {
                    "op": "unsubscribed",
                    "channel": "room.9",
                    "reason": "server",
                }
            publisher.publish("room.9", "gone")
            await expect_silence(here)
            # Taken off, the token's rights are what is left.
            again = await request(here, {"op": "subscribe", "channel": "room.9", "id": 2})
            assert again["code"] == "forbidden"


async def test_a_placed_channel_over_the_subscription_limit_is_told_to_the_client(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory(
        {**ENV, "GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_MAX_SUBSCRIPTIONS": "1"}
    )
    async with connect_as(gateway, "alice", channels=["news"]) as ws:
        await request(ws, {"op": "subscribe", "channel": "news", "id": 1})
        with Publisher(redis_server.url) as publisher:
            assert publisher.subscribe("alice", "room.1").connections == 0
        told = await recv_json(ws)
        assert (told["op"], told["code"]) == ("error", "limit")


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage",
        b'{"v":1,"op":"explode","user":"alice"}',
        b'{"v":1,"op":"subscribe","user":"alice"}',
        b'{"v":1,"op":"disconnect","user":"alice","code":1006}',
        b'{"v":1,"op":"disconnect","user":"alice","code":NaN}',
        b'{"v":1,"op":"subscribe","user":"alice","channel":"@@control"}',
    ],
)
async def test_a_malformed_request_is_counted_and_changes_nothing(
    redis_server: RedisServer, gateway_factory: GatewayFactory, payload: bytes
) -> None:
    gateway = gateway_factory({**ENV, "GATEWAY_REDIS_URL": redis_server.url})
    async with connect_as(gateway, "alice") as ws:
        assert redis_server.publish("ws:" + CONTROL_CHANNEL, payload) == 1
        await async_wait_until(
            lambda: (
                gateway.metric("wsgateway_control_requests_total", op="-", result="malformed") == 1
            )
        )
        await expect_silence(ws)
        # The replica goes on serving the next one.
        with Publisher(redis_server.url) as publisher:
            assert publisher.disconnect("alice", reason="after").connections == 1
        assert await closed_with(ws) == (1008, "after")
    assert "malformed control request" in gateway.logs()


async def test_a_refused_request_with_an_id_is_acknowledged_with_why(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """A service waiting for answers to a request the replicas refuse gets one from each,
    saying why, instead of a timeout it would take for a lost replica."""
    env = {**ENV, "GATEWAY_REDIS_URL": redis_server.url}
    gateway_factory(env), gateway_factory(env)
    r: Any = redis.Redis.from_url(redis_server.url)
    for request_id, payload in [
        ("k1", b'{"v":1,"op":"disconnect","user":"a","code":999,"id":"k1"}'),
        ("k2", b'{"v":1,"op":"subscribe","user":"a","id":"k2"}'),
        ("k3", b'{"v":1,"op":"disconnect","user":"a","id":"k3","user":"b"}'),
    ]:
        assert r.publish("ws:" + CONTROL_CHANNEL, payload) == 2
        answers = [json.loads(r.blpop([f"ws:@@ack.{request_id}"], timeout=5)[1]) for _ in (1, 2)]
        assert {a["connections"] for a in answers} == {0}
        assert len({a["replica"] for a in answers}) == 2
        errors = [a["error"] for a in answers]
        assert errors[0] == errors[1] and errors[0], errors
    assert "code" in errors[0] or "twice" in errors[0]
    tally = Tally()
    tally.add(b'{"replica":"r","connections":0,"error":"code: must be 1000"}')
    tally.add(b'{"replica":"s","connections":2}')
    assert tally.result(2).errors == ("code: must be 1000",)
    r.close()


async def test_requests_larger_than_any_valid_one_are_refused_unread(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """300 requests of 1 MB: before, each waited whole in the queue of 1,024 (the replica
    went from 65 to 352 MB and stayed there). Now one over MAX_REQUEST_BYTES (16 KiB, more
    than any valid request) is refused unread and counted as malformed."""
    gateway = gateway_factory({**ENV, "GATEWAY_REDIS_URL": redis_server.url})
    assert gateway.process is not None
    big = b'{"v":1,"op":"disconnect","user":"alice","x":"' + b"x" * 1_000_000 + b'"}'
    async with connect_as(gateway, "alice") as ws:
        before = rss_kib(gateway.process.pid)
        # Ten at a time: 32 MB unread would make Redis drop the replica's subscription.
        for sent in range(10, 301, 10):
            batch: list[tuple[str | bytes, ...]] = [("PUBLISH", "ws:" + CONTROL_CHANNEL, big)] * 10
            await asyncio.to_thread(redis_server.pipeline, batch)
            await async_wait_until(
                lambda sent=sent: (
                    gateway.metric("wsgateway_control_requests_total", op="-", result="malformed")
                    == sent
                )
            )
        assert gateway.metric("wsgateway_backplane_reconnects_total") == 0
        assert rss_kib(gateway.process.pid) - before < 16 * 1024
        # Refused as it arrived, before the queue: not parsed by the control task.
        assert "dropped a control request of 1000047 bytes, unread" in gateway.logs()
        with Publisher(redis_server.url) as publisher:  # the next one is served at once
            assert publisher.disconnect("alice", reason="é" * 100).connections == 1
        # A close frame carries 123 bytes of reason: cut at a character boundary.
        assert await closed_with(ws) == (1008, "é" * 61)


async def test_a_flood_of_control_requests_is_bounded_and_counted(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """30,000 requests published at once, faster than one task acknowledges them: at most
    control.QUEUE wait, the rest are dropped and counted, memory stays flat, and the replica
    still acts on the next request."""
    gateway = gateway_factory({**ENV, "GATEWAY_REDIS_URL": redis_server.url})
    assert gateway.process is not None
    flood = 30_000
    async with connect_as(gateway, "alice") as ws:
        before = rss_kib(gateway.process.pid)
        requests: list[tuple[str | bytes, ...]] = [
            (
                "PUBLISH",
                "ws:" + CONTROL_CHANNEL,
                build_control("disconnect", f"u{n}", request_id=f"f{n}"),
            )
            for n in range(flood)
        ]
        for start in range(0, flood, 5000):
            await asyncio.to_thread(redis_server.pipeline, requests[start : start + 5000])

        def handled() -> float:
            ok = gateway.metric("wsgateway_control_requests_total", op="disconnect", result="ok")
            dropped = gateway.metric("wsgateway_control_requests_total", op="-", result="dropped")
            return ok + dropped

        await async_wait_until(lambda: handled() == flood, timeout=60)
        dropped = gateway.metric("wsgateway_control_requests_total", op="-", result="dropped")
        assert 0 < dropped < flood, dropped
        assert rss_kib(gateway.process.pid) - before < 32 * 1024
        assert "dropped a control request: 1024 are waiting already" in gateway.logs()
        with Publisher(redis_server.url) as publisher:
            assert publisher.disconnect("alice").connections == 1
        assert (await closed_with(ws))[0] == 1008


async def test_clients_cannot_reach_the_control_channel(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**ENV, "GATEWAY_REDIS_URL": redis_server.url})
    everything = token(sub="eve", channels=["*"], publish=["*"], subs=["@@control"])
    async with client(f"{gateway.ws_url}?token={everything}") as ws:
        # The subs claim cannot put it there...
        refused = await recv_json(ws)
        assert (refused["op"], refused["code"]) == ("error", "forbidden")
        # ...nor can it ask, nor publish a request there.
        data = {"data": build_control("disconnect", "bob").decode()}
        for op, extra in (("subscribe", {}), ("publish", data)):
            answer = await request(ws, {"op": op, "channel": CONTROL_CHANNEL, "id": 1, **extra})
            assert answer["code"] == "forbidden", op
    assert gateway.metric("wsgateway_control_requests_total", op="-", result="malformed") == 0


def test_wspublish_sends_control_requests(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**ENV, "GATEWAY_REDIS_URL": redis_server.url})
    env = {"PUBLISHER_REDIS_URL": redis_server.url}

    async def scenario() -> None:
        async with connect_as(gateway, "alice", channels=[]) as ws:
            done = await asyncio.to_thread(
                wspublish, "room.2", "--user", "alice", "--subscribe", env=env
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == (
                "subscribe alice: 1 connection(s); 1 of 1 gateway(s) acknowledged"
            )
            assert await recv_json(ws) == {"op": "subscribed", "channel": "room.2"}
            done = await asyncio.to_thread(
                wspublish, "--user", "alice", "--disconnect", "--code", "4009", env=env
            )
            assert done.returncode == 0, done.stderr
            assert await closed_with(ws) == (4009, "disconnected by the service")

    asyncio.run(scenario())
    for args, message in [
        (["--user", "alice"], "needs --user and one of"),
        (["--disconnect"], "needs --user and one of"),
        (["room", "--user", "a", "--disconnect"], "takes no CHANNEL"),
        (["--user", "a", "--subscribe"], "need one"),
        (["--user", "a", "--disconnect", "--code", "2"], "code must be"),
        (["room", "--user", "a", "--subscribe", "--code", "4000"], "are for --disconnect"),
        (["room", "{}", "--user", "a", "--subscribe"], "carries no message"),
    ]:
        done = wspublish(*args, env=env)
        assert (done.returncode, message in done.stderr) == (2, True), (args, done.stderr)
    # A receiver that never answers (a bare subscriber, standing in for a replica that is
    # stuck): the request still ends at the timeout, and says who did not answer.
    silent = redis.Redis.from_url(redis_server.url).pubsub()  # type: ignore[no-untyped-call]
    silent.subscribe("ws:" + CONTROL_CHANNEL)
    try:
        done = wspublish("--user", "nobody", "--disconnect", "--timeout", "0.5", env=env)
        assert done.returncode == 3, done.stderr
        assert done.stdout.strip() == (
            "disconnect nobody: 0 connection(s); 1 of 2 gateway(s) acknowledged"
        )
    finally:
        silent.close()


async def test_control_survives_a_redis_restart(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """The control channel is re-subscribed with the clients' channels after an outage."""
    gateway = gateway_factory({**ENV, "GATEWAY_REDIS_URL": redis_server.url, **FAST_RECOVERY})
    async with connect_as(gateway, "alice") as ws:
        redis_server.kill()
        await async_wait_until(lambda: gateway.http("/readyz")[0] == 503)
        redis_server.start()
        await async_wait_until(lambda: gateway.http("/readyz")[0] == 200, timeout=15)
        assert "ws:@@control" in redis_server.command("PUBSUB", "CHANNELS", "*")
        async with AsyncPublisher(redis_server.url) as publisher:
            assert (await publisher.disconnect("alice")).connections == 1
        assert (await closed_with(ws))[0] == 1008


async def test_disconnect_on_a_redis_cluster(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    env = {**ENV, "GATEWAY_REDIS_URL": cluster.url}
    first, second = gateway_factory(env), gateway_factory(env)
    async with (
        connect_as(first, "alice") as here,
        connect_as(second, "alice") as there,
        AsyncPublisher(cluster.url) as publisher,
    ):
        assert await publisher.disconnect("alice", code=4000) == ControlResult(2, 2, 2)
        for ws in (here, there):
            assert (await closed_with(ws))[0] == 4000
