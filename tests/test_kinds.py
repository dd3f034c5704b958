"""Channel kinds from one place: the gateways write which channels keep history to Redis,
publishers follow it, and a difference is counted and logged rather than silently degrading
resumes. Exactly-once publishing through the library and ``wspublish``."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from publisher import Publisher
from publisher.history import HistoryPolicy, Outcome
from publisher.kinds import ChannelKinds, kinds_document, parse_kinds
from tests.harness import (
    GatewayFactory,
    RedisClusterServers,
    RedisServer,
    client,
    envelope,
    recv_json,
    request,
    wait_until,
    wspublish,
)

GATEWAYS = HistoryPolicy(
    ("prices.*", "scores.*"),
    size=50,
    ttl=60,
    retention=600,
    idempotency_window=30,
    state=("scores.*",),
)

# The rules, without sockets


def test_the_document_says_the_policy_and_reads_back() -> None:
    assert parse_kinds(kinds_document(GATEWAYS)) == GATEWAYS
    # Fields a later version adds are ignored; another version or garbage is refused.
    later = kinds_document(GATEWAYS)[:-1] + b',"later":{"patterns":["x"]}}'
    assert parse_kinds(later) == GATEWAYS
    deep = b'{"v":1,"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}"  # raised RecursionError
    for bad in (b"{}", b"not json", kinds_document(GATEWAYS).replace(b'"v":1', b'"v":2'), deep):
        with pytest.raises(ValueError):
            parse_kinds(bad)


def test_a_publisher_follows_the_gateways_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configured = HistoryPolicy(("news.*",))
    kinds = ChannelKinds(configured)
    assert kinds.due(0.0)
    with caplog.at_level(logging.WARNING, "wsgateway.publisher"):
        for now in (0.0, 10.0, 20.0):
            kinds.update(kinds_document(GATEWAYS), now)
    assert kinds.policy == GATEWAYS
    assert (kinds.mismatches, len(caplog.records)) == (1, 1)
    assert "following the gateways" in caplog.text
    assert not kinds.due(29.9) and kinds.due(30.0)
    kinds.update(None, 30.0)  # no gateway wrote one lately: its own configuration again
    assert kinds.policy == configured
    kinds.update(b"garbage", 40.0)
    assert kinds.policy == configured and "ignoring the gateways' channel kinds" in caplog.text
    # Told nothing, a publisher follows silently: the newcomer's case.
    quiet = ChannelKinds(HistoryPolicy())
    quiet.update(kinds_document(GATEWAYS), 0.0)
    assert (quiet.policy, quiet.mismatches) == (GATEWAYS, 0)


# Real gateways, real Redis


async def test_a_publisher_told_nothing_numbers_what_the_gateways_keep(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """The README's publisher snippet, on a history channel, with no PUBLISHER_HISTORY_*:
    its messages are numbered and stored, so a client that reconnects gets what it missed."""
    gateway = gateway_factory(
        {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_HISTORY_CHANNELS": "prices.*"}
    )
    r: Any = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: r.get("ws:@@channels") is not None)
    assert parse_kinds(r.get("ws:@@channels")).patterns == ("prices.*",)
    assert 0 < r.pttl("ws:@@channels") <= 60_000
    with Publisher(redis_server.url, history=HistoryPolicy()) as publisher:
        async with client(gateway.ws_url) as ws:
            await request(ws, {"op": "subscribe", "channel": "prices.eur", "id": 1})
            publisher.publish("prices.eur", 1)
            first = await recv_json(ws)
        assert first["offset"] == 1  # numbered: the publisher appended it
        publisher.publish("prices.eur", 2)  # while the client is away
        publisher.publish("plain.news", 3)  # not a history channel: a plain PUBLISH
    async with client(gateway.ws_url) as ws:
        since = {"offset": 1, "epoch": first["epoch"]}
        payload = {"op": "subscribe", "channel": "prices.eur", "id": 2, "since": since}
        reply = await request(ws, payload)
        assert reply["recovered"] is True
        missed = await recv_json(ws)
        assert (missed["data"], missed["offset"]) == (2, 2)
    assert r.exists("{ws:plain.news}:meta") == 0
    assert gateway.metric("wsgateway_history_total", event="unnumbered") == 0
    r.close()


async def test_a_mismatch_is_counted_and_logged_on_both_sides(
    redis_server: RedisServer, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_ANONYMOUS_PUBLISH": "*"}
    first = gateway_factory({**base, "GATEWAY_HISTORY_CHANNELS": "prices.*"})
    second = gateway_factory({**base, "GATEWAY_HISTORY_CHANNELS": "quotes.*"})
    # Each finds the other's document when it renews its own (every 10 s).
    wait_until(lambda: first.metric("wsgateway_kinds_mismatches_total") >= 1, timeout=25)
    wait_until(lambda: second.metric("wsgateway_kinds_mismatches_total") >= 1, timeout=25)
    assert "another replica says other history channels" in first.logs()
    # A publisher configured with other patterns follows the gateways, and says so.
    with (
        caplog.at_level(logging.WARNING, "wsgateway.publisher"),
        Publisher(redis_server.url, history=HistoryPolicy(("news.*",))) as publisher,
    ):
        publisher.publish("news.today", 1)
        assert publisher.kinds.mismatches == 1
        assert publisher.history.patterns in {("prices.*",), ("quotes.*",)}
    assert "following the gateways" in caplog.text
    # A plain PUBLISH on a history channel (a publisher that reads nothing): delivered,
    # counted and logged.
    async with client(first.ws_url) as ws:
        await request(ws, {"op": "subscribe", "channel": "prices.usd", "id": 1})
        redis_server.command("PUBLISH", "ws:prices.usd", envelope("prices.usd", 7))
        message = await recv_json(ws)
    assert message["data"] == 7 and "offset" not in message
    assert first.metric("wsgateway_history_total", event="unnumbered") == 1
    assert "keeps history but a publisher sent it an unnumbered message" in first.logs()


async def test_exactly_once_through_the_library_and_wspublish(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway_factory({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_HISTORY_CHANNELS": "doc.*"})
    r: Any = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: r.get("ws:@@channels") is not None)
    with Publisher(redis_server.url) as publisher:
        first = publisher.append("doc.1", {"n": 1}, idempotency_key="save-1")
        retry = publisher.append("doc.1", {"n": 1}, idempotency_key="save-1")
        assert (retry.offset, retry.outcome) == (first.offset, Outcome.DUPLICATE)
        assert publisher.append("doc.1", {"n": 2}, version=2).outcome is Outcome.PUBLISHED
        stale = publisher.append("doc.1", {"n": 1}, version=1)
        assert (stale.offset, stale.outcome) == (2, Outcome.STALE)
        with pytest.raises(ValueError, match="keeps no history"):
            publisher.append("other", 1, idempotency_key="k")
        with pytest.raises(ValueError, match="version must be"):
            publisher.append("doc.1", 1, version=-1)
    assert r.xlen("{ws:doc.1}:history") == 2
    url = ["--redis-url", redis_server.url]
    done = wspublish("doc.2", '"a"', "--idempotency-key", "k-1", *url)
    again = wspublish("doc.2", '"a"', "--idempotency-key", "k-1", *url)
    assert (done.returncode, again.returncode) == (0, 0), (done.stderr, again.stderr)
    assert "published at offset 1" in done.stdout
    assert "already published at offset 1" in again.stdout
    assert wspublish("doc.2", '"b"', "--version", "5", *url).returncode == 0
    stale_run = wspublish("doc.2", '"c"', "--version", "5", *url)
    assert stale_run.returncode == 4 and "not above the channel's" in stale_run.stderr
    assert wspublish("doc.2", "--stdin", "--version", "6", *url, stdin="1\n").returncode == 2
    plain = wspublish("plain", "1", "--idempotency-key", "k", *url)
    assert plain.returncode == 2 and "keeps no history" in plain.stderr
    assert r.xlen("{ws:doc.2}:history") == 2
    r.close()


async def test_exactly_once_on_a_cluster(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    """The idempotency records and the version live in the channel's slot (its hash tag):
    the script runs on one node of a Redis Cluster too."""
    gateway_factory({"GATEWAY_REDIS_URL": cluster.url, "GATEWAY_HISTORY_CHANNELS": "doc.*"})
    with Publisher(cluster.url) as publisher:
        # Until a replica has written which channels keep history, the publisher numbers none.
        wait_until(lambda: _follows(publisher, "doc.1"))
        for channel in ("doc.1", "doc.room{7}"):
            first = publisher.append(channel, 1, idempotency_key="k")
            again = publisher.append(channel, 1, idempotency_key="k")
            assert (again.offset, again.outcome) == (first.offset, Outcome.DUPLICATE)
            assert publisher.append(channel, 2, version=3).outcome is Outcome.PUBLISHED
            assert publisher.append(channel, 3, version=3).outcome is Outcome.STALE


def _follows(publisher: Publisher, channel: str) -> bool:
    """Whether the publisher, reading the gateways' kinds now, numbers ``channel``."""
    publisher.kinds.update(publisher._redis.get(publisher._kinds_key), 0.0)
    return publisher.history.applies(channel)
