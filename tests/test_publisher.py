"""The publisher library and wspublish against a real Redis and real replicas."""

from __future__ import annotations

import json

import pytest
import redis

from publisher import AsyncPublisher, EnvelopeError, Publisher
from tests.harness import GatewayProcess, RedisServer, client, free_port, recv_json, wspublish

DEAD_REDIS = f"redis://127.0.0.1:{free_port()}/0"


async def test_sync_and_async_publishers_count_the_gateways_that_received(
    redis_server: RedisServer, redis_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    one, two = redis_gateways
    async with (
        client(one.ws_url + "?channels=news") as a,
        client(two.ws_url + "?channels=news") as b,
    ):
        await recv_json(a)
        await recv_json(b)
        with Publisher(redis_server.url) as publisher:
            assert publisher.publish("news", {"n": 1}, mid="sync-1") == 2
            assert publisher.publish("nobody-listens", 1) == 0
        async with AsyncPublisher(redis_server.url) as publisher:
            assert await publisher.publish("news", {"n": 2}) == 2
        for ws in (a, b):
            first, second = await recv_json(ws), await recv_json(ws)
            assert (first["data"], first["mid"]) == ({"n": 1}, "sync-1")
            assert second["data"] == {"n": 2}


def test_publisher_uses_the_prefix(redis_server: RedisServer) -> None:
    with Publisher(redis_server.url, prefix="app1:") as publisher:
        publisher.publish("news", 1)
    # Nothing subscribes yet; then read the Redis channel name back from a subscriber.
    r = redis.Redis.from_url(redis_server.url)
    pubsub = r.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe("app1:news")
    pubsub.get_message(timeout=1)
    with Publisher(redis_server.url, prefix="app1:") as publisher:
        assert publisher.publish("news", {"k": "v"}) == 1
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["channel"] == b"app1:news"
    assert json.loads(message["data"])["data"] == {"k": "v"}
    r.close()


@pytest.mark.parametrize(
    ("channel", "data", "mid", "limit"),
    [
        ("bad channel", 1, None, 1024),
        ("c", float("nan"), None, 1024),
        ("c", "x" * 2000, None, 1000),
        ("c", 1, "bad mid", 1024),
    ],
)
async def test_bad_input_raises_before_anything_reaches_redis(
    channel: str, data: object, mid: str | None, limit: int
) -> None:
    # The Redis URL points at nothing: a ValueError, not a connection error, proves that the
    # message was refused before any attempt to reach Redis.
    with (
        Publisher(DEAD_REDIS, max_envelope_bytes=limit) as publisher,
        pytest.raises(ValueError),
    ):
        publisher.publish(channel, data, mid=mid)
    async with AsyncPublisher(DEAD_REDIS, max_envelope_bytes=limit) as apublisher:
        with pytest.raises(EnvelopeError):
            await apublisher.publish(channel, data, mid=mid)


def test_wspublish_exit_codes(redis_server: RedisServer) -> None:
    ok = wspublish("--redis-url", redis_server.url, "news", '{"a": 1}')
    assert ok.returncode == 0 and "published 1 message(s)" in ok.stdout
    stdin = wspublish(
        "--redis-url", redis_server.url, "news", "--stdin", stdin='1\n"two"\n\n{"three": 3}\n'
    )
    assert stdin.returncode == 0 and "published 3 message(s)" in stdin.stdout
    for args, stdin_text, code, words in [
        (("news", "{bad"), None, 2, "not valid JSON"),
        (("bad channel", "1"), None, 2, "invalid channel name"),
        (("news",), None, 2, "either a JSON argument or --stdin"),
        (("news", "1", "--stdin"), None, 2, "either a JSON argument or --stdin"),
        (("news", "--stdin"), "1\n{oops\n", 2, "line 2 is not valid JSON"),
    ]:
        result = wspublish("--redis-url", redis_server.url, *args, stdin=stdin_text)
        assert result.returncode == code, result
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr
    unreachable = wspublish("--redis-url", DEAD_REDIS, "news", "1")
    assert unreachable.returncode == 1
    assert "cannot publish through Redis" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


def test_wspublish_reads_publisher_environment(redis_server: RedisServer) -> None:
    result = wspublish("news", "1", env={"PUBLISHER_REDIS_URL": DEAD_REDIS})
    assert result.returncode == 1


def test_wspublish_numbers_and_stores_history_channels(redis_server: RedisServer) -> None:
    by_flag = wspublish(
        "--redis-url", redis_server.url, "--history-channels", "h.*", "h.a", "--stdin",
        stdin="1\n2\n",
    )  # fmt: skip
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = wspublish(
        "--redis-url", redis_server.url, "h.a", "3", env={"PUBLISHER_HISTORY_CHANNELS": "h.*"}
    )
    assert by_env.returncode == 0, by_env.stderr
    wspublish("--redis-url", redis_server.url, "plain", "4")
    stream = redis_server.command("XRANGE", "{ws:h.a}:history", "-", "+")
    assert [entry[0] for entry in stream] == ["0-1", "0-2", "0-3"]
    assert [json.loads(entry[1][1])["data"] for entry in stream] == [1, 2, 3]
    assert redis_server.command("EXISTS", "{ws:plain}:history") == 0
