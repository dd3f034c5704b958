"""Publishing from another language with nothing but docs/protocol.md: a Node.js publisher
(tests/conformance/publish.mjs, its own RESP, no Redis library) on plain and history
channels, tagged or not, through a real gateway, with resume, idempotency and versions."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis

from tests.harness import GatewayFactory, RedisServer, client, recv_json, request, wait_until

ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")


def node_publish(port: int, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert NODE is not None, "needs Node.js: ./dev test installs it with apt-get"
    done = subprocess.run(
        [
            NODE,
            str(ROOT / "tests" / "conformance" / "publish.mjs"),
            str(port),
            "ws:",
            str(ROOT / "publisher" / "lua" / "history_append.lua"),
        ],
        input="".join(json.dumps(r) + "\n" for r in requests),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_a_node_publisher_following_the_docs_works_on_every_kind_of_channel(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_HISTORY_CHANNELS": "hist.*,room{*",
            "GATEWAY_STATE_CHANNELS": "state.*",
        }
    )
    r: Any = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: r.get("ws:@@channels") is not None)
    channels = ["plain.a", "hist.a", "room{7}.b"]
    async with client(gateway.ws_url) as ws:
        replies = {}
        for n, channel in enumerate(channels):
            reply = await request(ws, {"op": "subscribe", "channel": channel, "id": n})
            replies[channel] = reply
        sent = node_publish(
            redis_server.port,
            [
                {"channel": "plain.a", "data": {"n": 1}},
                {"channel": "hist.a", "data": {"n": 2}, "pretty": True},
                {"channel": "room{7}.b", "data": {"n": 3}},
            ],
        )
        got = [await recv_json(ws) for _ in range(3)]
    assert [s.get("kind") for s in sent] == ["plain", "history", "history"], sent
    assert [(m["channel"], m["data"]) for m in got] == [
        ("plain.a", {"n": 1}),
        ("hist.a", {"n": 2}),
        ("room{7}.b", {"n": 3}),
    ]
    assert "offset" not in got[0]
    for message, published in zip(got[1:], sent[1:], strict=True):
        offset, epoch, receivers, outcome = published["reply"]
        assert message["offset"] == offset == 1 and message["epoch"] == epoch
        assert (receivers, outcome) == (1, "published")
    # The epoch a subscriber is told is the one its messages carry: the keys are the ones
    # the gateways read, tagged channel included.
    assert replies["room{7}.b"]["epoch"] in ("0", got[2]["epoch"])
    assert r.exists("ws:room{7}.b:meta") == 1

    # What the client misses while away comes back on resume.
    missed = node_publish(
        redis_server.port,
        [{"channel": "room{7}.b", "data": n} for n in (4, 5)],
    )
    assert [m["reply"][0] for m in missed] == [2, 3]
    async with client(gateway.ws_url) as ws:
        since = {"offset": 1, "epoch": got[2]["epoch"]}
        payload = {"op": "subscribe", "channel": "room{7}.b", "id": 9, "since": since}
        reply = await request(ws, payload)
        assert (reply["recovered"], reply["offset"]) == (True, 3)
        assert [(await recv_json(ws))["data"] for _ in range(2)] == [4, 5]

    # Exactly once, and bad input answered with the documented errors.
    results = node_publish(
        redis_server.port,
        [
            {"channel": "hist.a", "data": "order", "key": "order-1"},
            {"channel": "hist.a", "data": "order", "key": "order-1"},
            {"channel": "hist.a", "data": "v5", "version": 5},
            {"channel": "hist.a", "data": "v4", "version": 4},
            {"channel": "hist.a", "data": "bad", "version": "x"},
            {"channel": "hist.a", "data": "bad", "key": "has space"},
        ],
    )
    assert [r.get("reply", [None, None, None, None])[3] for r in results[:4]] == [
        "published",
        "duplicate",
        "published",
        "stale",
    ]
    assert results[0]["reply"][0] == results[1]["reply"][0] == 2
    assert "version must be a whole number" in results[4]["error"]
    assert "idempotency key must be" in results[5]["error"]
    assert r.xlen("{ws:hist.a}:history") == 3

    # A state channel is a history channel to a publisher; its late subscriber gets the
    # latest at once, whoever published it.
    state = node_publish(
        redis_server.port,
        [{"channel": "state.price", "data": p, "pretty": p == 2} for p in (1, 2, 3)],
    )
    assert [s["reply"][3] for s in state] == ["published"] * 3
    async with client(gateway.ws_url) as ws:
        reply = await request(ws, {"op": "subscribe", "channel": "state.price", "id": 1})
        assert (reply["offset"], reply["latest"]) == (3, True)
        assert (await recv_json(ws))["data"] == 3
    r.close()
