"""History channels: the pure rules, the Redis scripts, and resuming through real gateways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from gateway.history import Cursor, Page, Verdict, recover
from publisher import Publisher
from publisher.envelope import build_envelope, is_valid_channel, parse_envelope
from publisher.history import APPEND_LUA, HistoryPolicy, append_keys, history_keys, numbered
from tests.faults import TcpProxy
from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RedisServer,
    async_wait_until,
    client,
    expect_silence,
    recv_json,
    request,
    resume,
    subscribe,
    wait_until,
)

# The rules, without sockets


def test_no_position_starts_at_the_top() -> None:
    page: Page[bytes] = Page("e", 7, [])
    recovery = recover(page, None)
    assert (recovery.recovered, recovery.position, recovery.epoch, recovery.replay) == (
        False,
        7,
        "e",
        [],
    )


@pytest.mark.parametrize(
    ("page", "since", "recovered"),
    [
        (Page("e", 5, [(4, b"4"), (5, b"5")]), (3, "e"), True),
        (Page("e", 5, []), (5, "e"), True),  # nothing missed
        (Page("e", 5, [(5, b"5")]), (3, "e"), False),  # 4 was trimmed
        (Page("e", 5, [(4, b"4"), (5, b"5")]), (3, "old"), False),  # the stream restarted
        (Page("e", 5, []), (9, "e"), False),  # a position from the future
        (Page(None, 0, []), (3, "e"), False),  # no history at all
        (Page("e", 6, [(4, b"4"), (5, b"5")]), (3, "e"), False),  # the read stopped short
        # Offset 0 of the empty epoch: seen before the channel had history.
        (Page(None, 0, []), (0, "0"), True),  # still none: nothing missed
        (Page("e", 2, [(1, b"1"), (2, b"2")]), (0, "0"), True),  # all of it since
        (Page("e", 2, [(2, b"2")]), (0, "0"), False),  # its first message is gone
        (Page(None, 0, []), (3, "0"), False),  # no such position
        (Page(None, 0, []), (0, "e"), False),  # the history was lost
    ],
)
def test_recover(page: Page[bytes], since: tuple[int, str], recovered: bool) -> None:
    recovery = recover(page, since)
    assert recovery.recovered is recovered
    assert recovery.position == page.top
    assert recovery.replay == (page.entries if recovered else [])


def test_cursor_delivers_once_in_order_and_sees_gaps() -> None:
    cursor = Cursor()
    assert cursor.check("e", 4) is Verdict.DELIVER  # the first one seen
    cursor.advance("e", 4)
    assert cursor.check("e", 5) is Verdict.DELIVER
    assert cursor.check("e", 4) is Verdict.DUPLICATE
    assert cursor.check("e", 3) is Verdict.DUPLICATE
    assert cursor.check("e", 7) is Verdict.GAP
    assert cursor.check("f", 1) is Verdict.DELIVER  # a new epoch from its start
    assert cursor.check("f", 2) is Verdict.GAP  # a new epoch, its first message missed
    assert (cursor.after("e"), cursor.after("f")) == (4, 0)


def test_numbered_turns_version_1_into_version_2() -> None:
    envelope = build_envelope("news", {"a": [1]}, mid="m", ts=5)
    model = parse_envelope(numbered(envelope, 12, "ep"), strict=True)
    assert model.model_dump() == {
        "v": 2,
        "channel": "news",
        "data": {"a": [1]},
        "mid": "m",
        "ts": 5,
        "traceparent": None,
        "tracestate": None,
        "event": None,
        "offset": 12,
        "epoch": "ep",
    }
    with pytest.raises(ValueError, match='v":1'):
        numbered(b'{"channel":"news","v":1}', 1, "ep")


# The Redis scripts


def _append(r: Any, policy: HistoryPolicy, channel: str, data: Any) -> list[Any]:
    script = r.register_script(APPEND_LUA)
    keys = append_keys("ws:", channel)
    result: list[Any] = script(
        keys, policy.append_args("ws:" + channel, build_envelope(channel, data))
    )
    return result


def test_append_script_numbers_stores_trims_and_publishes(redis_server: RedisServer) -> None:
    r: Any = redis.Redis.from_url(redis_server.url)
    policy = HistoryPolicy(("*",), size=3, ttl=60)
    subscriber = r.pubsub()
    subscriber.subscribe("ws:news")
    subscriber.get_message(timeout=1)
    results = [_append(r, policy, "news", n) for n in range(5)]
    epoch = results[0][1]
    assert [tuple(result) for result in results] == [
        (n, epoch, 1, b"published") for n in range(1, 6)
    ]
    stream, meta = history_keys("ws:", "news")
    entries = r.xrange(stream)
    assert [entry_id for entry_id, _ in entries] == [b"0-3", b"0-4", b"0-5"]  # size 3
    published = [subscriber.get_message(timeout=1) for _ in range(5)]
    stored = [fields[b"e"] for _, fields in entries]
    assert [m["data"] for m in published if m][-3:] == stored  # the same bytes
    assert json.loads(stored[-1]) | {"mid": "x", "ts": 0} == {
        "v": 2,
        "channel": "news",
        "data": 4,
        "mid": "x",
        "ts": 0,
        "offset": 5,
        "epoch": epoch.decode(),
    }
    assert 0 < r.pttl(stream) <= policy.retention_ms and r.pttl(meta) > 0
    subscriber.close()


def test_append_script_trims_by_age_and_refuses_foreign_envelopes(
    redis_server: RedisServer,
) -> None:
    r: Any = redis.Redis.from_url(redis_server.url)
    policy = HistoryPolicy(("*",), size=100, ttl=0.3)
    for n in range(4):
        _append(r, policy, "news", n)
    time.sleep(0.4)
    _append(r, policy, "news", 4)
    stream, _ = history_keys("ws:", "news")
    assert [entry_id for entry_id, _ in r.xrange(stream)] == [b"0-5"]
    script = r.register_script(APPEND_LUA)
    with pytest.raises(redis.ResponseError, match="envelope channel must be"):
        script(list(history_keys("ws:", "news")), policy.append_args("ws:news", b'{"v": 1}'))
    # An epoch the gateways would refuse is not stored for a new channel (found trying the
    # docs as a publisher in another language: every later message was dropped as malformed).
    good = build_envelope("fresh", 1)
    for epoch in ("has space", "", "x" * 65, "é"):
        args = policy.append_args("ws:fresh", good)
        args[5] = epoch
        with pytest.raises(redis.ResponseError, match="epoch must be"):
            script(list(history_keys("ws:", "fresh")), args)
    assert r.exists(*history_keys("ws:", "fresh")) == 0


def test_a_lost_history_starts_a_new_epoch(redis_server: RedisServer) -> None:
    r: Any = redis.Redis.from_url(redis_server.url)
    policy = HistoryPolicy(("*",))
    first = _append(r, policy, "news", 1)
    r.flushall()
    second = _append(r, policy, "news", 2)
    assert second[0] == 1 and second[1] != first[1]


# Through real gateways

HISTORY = {"GATEWAY_HISTORY_CHANNELS": "h.*", "GATEWAY_ANONYMOUS_PUBLISH": "*"}


async def _publish(url: str, channel: str, values: range) -> None:
    async with client(url) as ws:
        for value in values:
            reply = await request(ws, {"op": "publish", "channel": channel, "data": value, "id": 1})
            assert reply["op"] == "published", reply


async def _messages(ws: Any, count: int) -> list[dict[str, Any]]:
    return [await recv_json(ws) for _ in range(count)]


@pytest.fixture(params=["memory", "redis"])
def history_gateway(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory
) -> GatewayProcess:
    env = dict(HISTORY)
    if request.param == "redis":
        env["GATEWAY_REDIS_URL"] = request.getfixturevalue("redis_server").url
    return gateway_factory(env)


async def test_resume_replays_what_was_missed_then_goes_live(
    history_gateway: GatewayProcess,
) -> None:
    url = history_gateway.ws_url
    async with client(url) as ws:
        # Before its first message a channel is at offset 0 of the empty epoch "0".
        reply = await subscribe(ws, "h.news")
        assert (reply["offset"], reply["epoch"]) == (0, "0") and "recovered" not in reply
        await _publish(url, "h.news", range(3))
        got = await _messages(ws, 3)
        epoch = got[0]["epoch"]
        assert epoch != "0"
        assert [(m["data"], m["offset"], m["epoch"]) for m in got] == [
            (n, n + 1, epoch) for n in range(3)
        ]
    await _publish(url, "h.news", range(3, 6))  # while nobody listens
    async with client(url) as ws:
        reply = await subscribe(ws, "h.news", {"offset": 3, "epoch": epoch})
        assert (reply["recovered"], reply["offset"], reply["epoch"]) == (True, 6, epoch)
        await _publish(url, "h.news", range(6, 8))
        got = await _messages(ws, 4)
        assert [(m["data"], m["offset"]) for m in got] == [(n, n + 1) for n in range(3, 7)]
    async with client(url) as ws:
        # A position taken before the channel had history resumes from its first message.
        reply = await subscribe(ws, "h.news", {"offset": 0, "epoch": "0"})
        assert (reply["recovered"], reply["offset"], reply["epoch"]) == (True, 8, epoch)
        got = await _messages(ws, 8)
        assert [m["offset"] for m in got] == list(range(1, 9))


async def test_reads_of_channels_never_published_to_create_nothing(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Subscribing to (and resuming on) unused history channel names leaves no Redis key:
    an attacker cannot fill Redis for the retention period by naming channels."""
    gateway = gateway_factory({**HISTORY, "GATEWAY_REDIS_URL": redis_server.url})
    async with client(gateway.ws_url) as ws:
        for n in range(50):
            since = {"offset": 0, "epoch": "0"} if n % 2 else {"offset": 4, "epoch": "e1"}
            reply = await subscribe(ws, f"h.unused.{n}", since)
            assert (reply["offset"], reply["epoch"]) == (0, "0")
            assert reply["recovered"] is (n % 2 == 1)  # nothing was missed from nothing
    assert redis_server.client_keys() == set()
    await _publish(gateway.ws_url, "h.used", range(1))
    # A publish makes the stream and its meta.
    assert redis_server.client_keys() == {"{ws:h.used}:history", "{ws:h.used}:meta"}


async def test_resume_that_cannot_be_complete_says_so(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({**HISTORY, "GATEWAY_HISTORY_SIZE": "2"})
    url = gateway.ws_url
    await _publish(url, "h.news", range(5))
    async with client(url) as ws:
        epoch = (await subscribe(ws, "h.news"))["epoch"]
        for since in ({"offset": 1, "epoch": epoch}, {"offset": 3, "epoch": "other"}):
            reply = await subscribe(ws, "h.other")  # (a second channel keeps ids apart)
            await request(ws, {"op": "unsubscribe", "channel": "h.news"})
            reply = await subscribe(ws, "h.news", since)
            assert (reply["recovered"], reply["offset"], reply["epoch"]) == (False, 5, epoch)
        await _publish(url, "h.news", range(5, 6))
        message = await recv_json(ws)
        assert (message["data"], message["offset"]) == (5, 6)  # live from the top, no replay
        # A channel without history cannot resume at all.
        reply = await subscribe(ws, "plain", {"offset": 1, "epoch": epoch})
        assert reply["recovered"] is False and "offset" not in reply


@pytest.mark.parametrize(
    "since",
    [{"offset": -1, "epoch": "e"}, {"offset": 1, "epoch": "a b"}, {"offset": 1}, 5, {"epoch": "e"}],
)
async def test_bad_positions_are_bad_requests(memory_gateway: GatewayProcess, since: Any) -> None:
    async with client(memory_gateway.ws_url) as ws:
        reply = await subscribe(ws, "news", since)
        assert (reply["op"], reply["code"], reply["id"]) == ("error", "bad_request", 1)


async def test_resume_under_live_load_has_no_gap_and_no_duplicate(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Clients resume from different positions while messages keep arriving; each ends with
    exactly the messages after its position."""
    env = {**HISTORY, "GATEWAY_REDIS_URL": redis_server.url}
    gateway = gateway_factory(env)
    total = 400
    policy = HistoryPolicy(("h.*",))
    with Publisher(redis_server.url, history=policy) as publisher:
        for n in range(50):
            publisher.publish("h.load", n)
        async with client(gateway.ws_url) as probe:
            epoch = (await subscribe(probe, "h.load"))["epoch"]

        async def publish_rest() -> None:
            for n in range(50, total):
                await asyncio.to_thread(publisher.publish, "h.load", n)
                if n % 20 == 0:
                    await asyncio.sleep(0.005)

        async def offsets_after(since: int) -> list[int]:
            messages = await resume(gateway.ws_url, "h.load", since, epoch, total)
            assert all(message["data"] == message["offset"] - 1 for message in messages)
            return [message["offset"] for message in messages]

        publishing = asyncio.create_task(publish_rest())
        starts = [0, 10, 25, 49, 30, 45, 5, 40]
        resumed = []
        for since in starts:  # joining one after another while the publisher runs
            resumed.append(asyncio.create_task(offsets_after(since)))
            await asyncio.sleep(0.05)
        burst = [3, 48, 17, 33, 0, 49]  # and together, as after a replica died: one shared read
        starts += burst
        resumed.extend(asyncio.create_task(offsets_after(since)) for since in burst)
        results = await asyncio.gather(*resumed)
        await publishing
    for since, offsets in zip(starts, results, strict=True):
        assert offsets == list(range(since + 1, total + 1))


@pytest.mark.parametrize(("size", "expected", "lost"), [(100, [3, 4, 5], 0), (2, [4, 5], 1)])
async def test_a_gap_in_live_offsets_is_filled_from_the_stream(
    redis_server: RedisServer,
    gateway_factory: GatewayFactory,
    size: int,
    expected: list[int],
    lost: int,
) -> None:
    gateway = gateway_factory({**HISTORY, "GATEWAY_REDIS_URL": redis_server.url})
    r: Any = redis.Redis.from_url(redis_server.url)
    policy = HistoryPolicy(("h.*",), size=size)
    keys = list(history_keys("ws:", "h.gap"))
    script = r.register_script(APPEND_LUA)
    async with client(gateway.ws_url) as ws:
        await subscribe(ws, "h.gap")
        for n in (1, 2):
            script(keys, policy.append_args("ws:h.gap", build_envelope("h.gap", n)))
        assert [m["offset"] for m in await _messages(ws, 2)] == [1, 2]
        for n in (3, 4):  # stored, but sent with SPUBLISH, which SUBSCRIBE misses
            args = policy.append_args("ws:h.gap", build_envelope("h.gap", n), sharded=True)
            script(keys, args)
        script(keys, policy.append_args("ws:h.gap", build_envelope("h.gap", 5)))
        got = await _messages(ws, len(expected))
        assert [(m["offset"], m["data"]) for m in got] == [(n, n) for n in expected]
    events = history_events(gateway)
    # The stream's copy of 5 comes first; the held live one is then a duplicate.
    expected_events = {"filled": len(expected), "duplicate": 1, "replayed": 0}
    assert events == expected_events | ({"lost": lost} if lost else {})


@pytest.mark.parametrize("recovers", [True, False], ids=["read-recovers", "read-never-works"])
async def test_a_history_read_that_fails_is_retried_then_given_up(
    redis_server: RedisServer, gateway_factory: GatewayFactory, recovers: bool
) -> None:
    """The fill of a gap meets a real Redis error (the replica's ACL user may not run scripts):
    it is retried with backoff, and after five failed tries the held live message is
    delivered anyway, the gap counted lost: a broken history never stops live delivery."""
    redis_server.command("ACL", "SETUSER", "gateway", "on", ">secret", "~*", "&*", "+@all")
    url = redis_server.url.replace("redis://", "redis://gateway:secret@")
    gateway = gateway_factory({**HISTORY, "GATEWAY_REDIS_URL": url})
    r: Any = redis.Redis.from_url(redis_server.url)
    policy = HistoryPolicy(("h.*",))
    keys = list(history_keys("ws:", "h.retry"))
    script = r.register_script(APPEND_LUA)
    async with client(gateway.ws_url) as ws:
        await subscribe(ws, "h.retry")
        script(keys, policy.append_args("ws:h.retry", build_envelope("h.retry", 1)))
        assert [m["offset"] for m in await _messages(ws, 1)] == [1]
        redis_server.command("ACL", "SETUSER", "gateway", "-@scripting")
        for n in (2, 3):  # stored, but sent with SPUBLISH, which SUBSCRIBE misses
            args = policy.append_args("ws:h.retry", build_envelope("h.retry", n), sharded=True)
            script(keys, args)
        script(keys, policy.append_args("ws:h.retry", build_envelope("h.retry", 4)))
        await async_wait_until(lambda: gateway.logs().count("cannot read history") >= 2)
        if recovers:
            redis_server.command("ACL", "SETUSER", "gateway", "+@scripting")
            got = await _messages(ws, 3)
            assert [(m["offset"], m["data"]) for m in got] == [(2, 2), (3, 3), (4, 4)]
            assert history_events(gateway) == {"filled": 3, "duplicate": 1, "replayed": 0}
        else:
            got = await _messages(ws, 1)  # after five tries: what was held, the gap lost
            assert [(m["offset"], m["data"]) for m in got] == [(4, 4)]
            assert gateway.logs().count("cannot read history") == 4
            assert "gave up reading its history" in gateway.logs()
            assert history_events(gateway) == {"filled": 0, "lost": 2, "replayed": 0}
        await expect_silence(ws)


def history_events(gateway: GatewayProcess) -> dict[str, float]:
    status, text = gateway.http("/metrics")
    assert status == 200
    return {
        sample.labels["event"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "wsgateway_history_total"
    }


async def test_a_version_1_message_on_a_history_channel_is_delivered_unnumbered(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**HISTORY, "GATEWAY_REDIS_URL": redis_server.url})
    async with client(gateway.ws_url) as ws:
        await subscribe(ws, "h.old")
        # A publisher that predates history (or is not configured for it) PUBLISHes version 1.
        assert redis_server.publish("ws:h.old", build_envelope("h.old", "legacy")) == 1
        message = await recv_json(ws)
        assert message["data"] == "legacy" and "offset" not in message
    assert history_events(gateway)["unnumbered"] == 1


async def test_a_burst_of_resumes_on_many_channels_waits_for_redis_connections(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """More concurrent history reads than connections to Redis (redis-py's default pool
    refuses past 100): they queue for the bounded pool instead of failing."""
    gateway = gateway_factory(
        {
            **HISTORY,
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_REDIS_MAX_CONNECTIONS": "8",
            "GATEWAY_RATE_LIMIT": "1000",
        }
    )
    count = 150
    channels = [f"h.burst{n}" for n in range(count)]
    async with contextlib.AsyncExitStack() as stack:
        # Two clients hold every channel, so the burst below waits for no SUBSCRIBE: only
        # its history reads, all at once.
        for half in (channels[: count // 2], channels[count // 2 :]):
            anchor = await stack.enter_async_context(client(gateway.ws_url))
            for channel in half:
                await subscribe(anchor, channel)
        sockets = [await stack.enter_async_context(client(gateway.ws_url)) for _ in range(count)]
        replies = await asyncio.gather(
            *(subscribe(ws, channel, {"offset": 0, "epoch": "e"})
              for channel, ws in zip(channels, sockets, strict=True))
        )  # fmt: skip
    assert [reply["op"] for reply in replies] == ["subscribed"] * count
    clients = redis_server.command("CLIENT", "LIST").count("\n")
    assert clients <= 8 + 1 + 2  # the pool, the subscriber, this CLIENT LIST (and slack)


async def test_a_history_restarted_during_an_outage_is_filled_from_its_new_start(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Redis loses the history while the replica is cut off (a restart without persistence,
    a failover that lost the last writes): the new epoch's messages all arrive, from 1."""
    proxy = TcpProxy(redis_server.port).start()
    try:
        gateway = gateway_factory(
            {
                **HISTORY,
                "GATEWAY_REDIS_URL": proxy.url,
                "GATEWAY_RECONNECT_MIN": "0.05",
                "GATEWAY_RECONNECT_MAX": "0.2",
            }
        )
        policy = HistoryPolicy(("h.*",))
        with Publisher(redis_server.url, history=policy) as publisher:
            async with client(gateway.ws_url) as ws:
                old_epoch = (await subscribe(ws, "h.reset"))["epoch"]
                for n in (1, 2):
                    publisher.publish("h.reset", n)
                assert [m["offset"] for m in await _messages(ws, 2)] == [1, 2]
                proxy.refusing = True
                proxy.cut()
                await asyncio.to_thread(wait_until, lambda: gateway.http_status("/readyz") == 503)
                redis_server.command("FLUSHALL")
                for n in (3, 4, 5):
                    publisher.publish("h.reset", n)
                proxy.refusing = False
                got = await _messages(ws, 3)
        assert [(m["data"], m["offset"]) for m in got] == [(3, 1), (4, 2), (5, 3)]
        assert len({m["epoch"] for m in got}) == 1 and got[0]["epoch"] != old_epoch
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "channel", ["news", "room{7}.chat", "{room7}.typing", "{r}", "a{b}", "x.y:z@w/v-u_t"]
)
def test_history_keys_live_in_the_slot_of_their_channel(channel: str) -> None:
    assert is_valid_channel(channel)
    stream, meta = history_keys("ws:", channel)
    slot = key_slot(("ws:" + channel).encode())
    assert key_slot(stream.encode()) == key_slot(meta.encode()) == slot
    assert stream != meta and channel in stream
