"""Delta compression: a subscriber that asks for Fossil deltas ends with byte-identical
documents to one that receives full messages, through gaps, a replica kill and a resume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from typing import Any

import msgspec
import pytest
import redis
from websockets.frames import Frame

from gateway import fossil
from gateway.client import Client, Message
from gateway.deltas import DeltaChain
from gateway.envelope import decode_envelope
from publisher import Publisher
from publisher.envelope import build_envelope
from publisher.history import APPEND_LUA, HistoryPolicy, append_keys
from tests.harness import (
    GatewayFactory,
    RawClient,
    RedisServer,
    client,
    delta_problems,
    expect_silence,
    recv_json,
    request,
    wait_until,
)

DELTAS = {
    "GATEWAY_HISTORY_CHANNELS": "doc.*",
    "GATEWAY_DELTA_CHANNELS": "doc.*",
    "GATEWAY_ANONYMOUS_PUBLISH": "*",
}


class _Data(msgspec.Struct):
    data: msgspec.Raw


def document(version: int) -> dict[str, Any]:
    """A 4 KiB document of which each version changes two fields."""
    rows = [{"id": n, "name": f"row {n}", "value": n * 1.5, "ok": True} for n in range(70)]
    rows[version % 70]["value"] = version
    rows[(version * 7) % 70]["name"] = f"renamed {version}"
    return {"version": version, "rows": rows}


# Without sockets


def test_a_chain_makes_deltas_only_for_consecutive_messages() -> None:
    chain = DeltaChain(65536)

    def envelope(offset: int, epoch: str = "e") -> Any:
        payload = build_envelope("doc.1", document(offset))
        return decode_envelope(
            b'{"v":2,%s,"offset":%d,"epoch":"%s"}' % (payload[7:-1], offset, epoch.encode()),
            "doc.1",
        )

    frames = [chain.add(envelope(n)) for n in (1, 2, 4)] + [chain.add(envelope(5, "f"))]
    assert [delta is None for _, delta in frames] == [True, False, True, True]
    full, delta = frames[1]
    assert delta is not None and len(delta) < len(full) / 10
    first = json.loads(frames[0][0].text)
    second = json.loads(delta.text)
    assert (second["delta"], first["delta"]) == (True, False)
    rebuilt = fossil.apply(first["data"].encode(), second["data"].encode())
    assert json.loads(rebuilt) == document(2)


# Real gateways


async def test_deltas_rebuild_exactly_what_full_subscribers_get(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**DELTAS, "GATEWAY_REDIS_URL": redis_server.url})
    r: Any = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: r.get("ws:@@channels") is not None)
    script = r.register_script(APPEND_LUA)
    policy = HistoryPolicy(("doc.*",))
    with Publisher(redis_server.url) as publisher:
        async with client(gateway.ws_url) as full, client(gateway.ws_url) as thin:
            assert "delta" not in await request(
                full, {"op": "subscribe", "channel": "doc.1", "id": 1}
            )
            reply = await request(
                thin, {"op": "subscribe", "channel": "doc.1", "id": 1, "delta": "fossil"}
            )
            assert reply["delta"] is True
            for version in range(1, 6):
                publisher.publish("doc.1", document(version))
            # Two stored but sent where the gateway does not listen: a gap it fills.
            for version in (6, 7):
                envelope = build_envelope("doc.1", document(version))
                script(
                    append_keys("ws:", "doc.1"),
                    policy.append_args("ws:doc.1", envelope, sharded=True),
                )
            for version in range(8, 11):
                publisher.publish("doc.1", document(version))
            plain = [await full.recv() for _ in range(10)]
            thin_frames = [json.loads(await thin.recv()) for _ in range(10)]
            await expect_silence(thin)
    texts = [bytes(msgspec.json.decode(frame, type=_Data).data) for frame in plain]
    base = b""
    rebuilt = []
    for frame in thin_frames:
        text = frame["data"].encode()
        base = fossil.apply(base, text) if frame["delta"] else text
        rebuilt.append(base)
    assert rebuilt == texts  # byte for byte
    assert [f["offset"] for f in thin_frames] == list(range(1, 11))
    assert [f["delta"] for f in thin_frames] == [False] + [True] * 9
    sizes = [len(f["data"]) for f in thin_frames[1:]]
    assert max(sizes) * 10 < len(texts[0]), sizes
    r.close()


@pytest.mark.parametrize("backplane", ["redis", "cluster"])
async def test_the_python_client_applies_deltas_through_a_replica_kill_and_a_resume(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory, backplane: str
) -> None:
    fixture = "redis_server" if backplane == "redis" else "cluster"
    redis_url = request.getfixturevalue(fixture).url
    env = {**DELTAS, "GATEWAY_REDIS_URL": redis_url}
    first, second = gateway_factory(env), gateway_factory(env)
    urls = [first.ws_url, second.ws_url]
    received: dict[bool, list[tuple[int | None, Any]]] = {True: [], False: []}
    connects: dict[bool, int] = {}

    async def follow(deltas: bool, until: int) -> None:
        async with Client(urls, ["doc.k"], deltas=deltas, backoff_max=0.2) as follower:
            async for event in follower:
                if isinstance(event, Message):
                    received[deltas].append((event.offset, event.data))
                    if event.offset == until:
                        connects[deltas] = follower.connects
                        return

    with Publisher(redis_url) as publisher:
        publisher.publish("doc.k", document(0))  # before anyone: not received
        tasks = [asyncio.create_task(follow(deltas, 31)) for deltas in (True, False)]
        await asyncio.sleep(1.0)
        for version in range(1, 31):
            publisher.publish("doc.k", document(version))
            await asyncio.sleep(0.02)
            if version == 10:  # both clients move to the other replica and resume
                assert first.process is not None
                first.process.send_signal(signal.SIGKILL)
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)
    assert connects == {True: 2, False: 2}  # the first replica, then the other
    assert received[True] == received[False]
    assert [offset for offset, _ in received[True]] == list(range(2, 32))
    assert [data for _, data in received[True]] == [document(v) for v in range(1, 31)]


async def test_delta_options_and_their_errors(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({**DELTAS, "GATEWAY_HISTORY_CHANNELS": "doc.*,log.*"})
    async with client(gateway.ws_url) as ws:
        error = await request(
            ws, {"op": "subscribe", "channel": "doc.2", "id": 3, "delta": "xdelta"}
        )
        assert (error["op"], error["code"], error["id"]) == ("error", "bad_request", 3)
        # Asked where it is not allowed: a plain subscription, plain frames.
        reply = await request(
            ws, {"op": "subscribe", "channel": "log.1", "id": 4, "delta": "fossil"}
        )
        assert "delta" not in reply
        await request(ws, {"op": "publish", "channel": "log.1", "data": {"a": 1}, "id": 5})
        message = await recv_json(ws)
        assert message["data"] == {"a": 1} and "delta" not in message


async def test_a_base_that_went_wrong_makes_the_client_resume_not_show_garbage(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**DELTAS, "GATEWAY_REDIS_URL": redis_server.url})
    seen: list[Any] = []
    with Publisher(redis_server.url) as publisher:
        async with Client(gateway.ws_url, ["doc.c"], deltas=True, backoff_max=0.2) as follower:
            events = aiter(follower)
            await asyncio.sleep(0.5)  # subscribed
            for version in (1, 2):
                publisher.publish("doc.c", document(version))
                seen.append((await anext(events)).data)  # type: ignore[union-attr]
            offset, epoch, _ = follower._bases["doc.c"]
            follower._bases["doc.c"] = (offset, epoch, b"not what the gateway sent")
            publisher.publish("doc.c", document(3))  # a delta that fails its checksum
            seen.append((await anext(events)).data)  # type: ignore[union-attr]
            assert follower.connects == 2  # it reconnected and resumed from offset 2
    assert seen == [document(v) for v in (1, 2, 3)]


@pytest.mark.parametrize(
    ("policy", "bound"),
    [
        ("drop-oldest", {"GATEWAY_QUEUE_MAX_MESSAGES": "3"}),
        ("drop-oldest", {"GATEWAY_QUEUE_MAX_BYTES": "2048"}),
        ("drop-newest", {"GATEWAY_QUEUE_MAX_BYTES": "2048"}),
    ],
    ids=["drop-oldest-messages", "drop-oldest-bytes", "drop-newest-bytes"],
)
def test_a_subscriber_whose_queue_dropped_messages_gets_a_full_text_next(
    redis_server: RedisServer, gateway_factory: GatewayFactory, policy: str, bound: dict[str, str]
) -> None:
    """A slow subscriber's queue loses messages, deltas among them: every delta it does
    receive applies to the text it holds. After a drop the gateway sends the full text, and
    a queue that drops a message swaps the delta queued after it for its full text. (Before,
    with a byte bound below a document's size, a third of the deltas a slow reader got were
    made against a message its queue had dropped: the full text that began a batch did not
    fit, the deltas after it did.)"""
    gateway = gateway_factory(
        {
            **DELTAS,
            **bound,
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_SLOW_CONSUMER_POLICY": policy,
            "GATEWAY_WRITE_LIMIT": "4096",
            "GATEWAY_SEND_BUFFER": "4096",
        }
    )
    slow = RawClient(gateway.ws_url, rcvbuf=4096)
    slow.send_text(b'{"op":"subscribe","channel":"doc.s","id":1,"delta":"fossil"}')
    assert json.loads(bytes(slow.read_frames(1.0)[0].data))["delta"] is True

    def publish() -> None:
        with Publisher(redis_server.url) as publisher:
            for version in range(1, 400):
                publisher.publish("doc.s", document(version))
                time.sleep(0.001)

    publishing = threading.Thread(target=publish)
    publishing.start()
    # A slow reader: 256 bytes every 10 ms, while the messages arrive at 500 a second or so.
    received: list[Frame] = []
    slow.sock.settimeout(0.01)
    while publishing.is_alive():
        with contextlib.suppress(TimeoutError):
            received += [e for e in slow.feed(slow.sock.recv(256)) if isinstance(e, Frame)]
        time.sleep(0.01)
    publishing.join()
    received += slow.read_frames(1.0)
    assert gateway.metric("wsgateway_deliveries_dropped_total") > 0
    frames = [json.loads(bytes(f.data)) for f in received]
    slow.close()
    messages = [f for f in frames if f.get("op") == "message"]
    assert sum(m["delta"] for m in messages) > 10, messages[:3]
    text, offset = None, None
    useless = []
    for m in messages:
        if m["delta"]:
            if offset != m["offset"] - 1 or text is None:
                useless.append(m["offset"])  # a delta without its base
                text = None
                continue
            text = fossil.apply(text, m["data"].encode())
        else:
            text = m["data"].encode()
        offset = m["offset"]
        assert json.loads(text)["version"] == m["offset"]
    assert useless == [], f"{len(useless)} of {len(messages)} deltas without their base"


@pytest.mark.parametrize("coalesce", ["adaptive", "window"])
async def test_delta_subscribers_that_leave_and_come_back_lose_nothing(
    redis_server: RedisServer, gateway_factory: GatewayFactory, coalesce: str
) -> None:
    """A plain subscriber keeps a busy delta channel on the replica while delta subscribers
    unsubscribe and subscribe again in a loop, often while a batch waits for its write.
    Before, the full texts and deltas of a batch were left behind when the last delta
    subscriber left before the write, and the next one's batch paired stale texts with new
    messages: messages lost, or 1011 with a traceback. Now every subscription gets every
    message after its reply's offset, the first as its full text, each delta applying."""
    gateway = gateway_factory(
        {
            **DELTAS,
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_COALESCE": coalesce,
            "GATEWAY_RATE_LIMIT": "1000",
        }
    )
    stop = asyncio.Event()

    async def publish() -> None:
        from publisher import AsyncPublisher

        async with AsyncPublisher(redis_server.url) as publisher:
            version = 0
            while not stop.is_set():
                version += 1
                await publisher.publish("doc.busy", {"v": version, "pad": "x" * 200})
                await asyncio.sleep(0.004)

    async def churn(rounds: int) -> tuple[int, list[str]]:
        problems: list[str] = []
        received = 0
        async with client(gateway.ws_url) as ws:
            for n in range(rounds):
                reply = await request(
                    ws, {"op": "subscribe", "channel": "doc.busy", "id": n, "delta": "fossil"}
                )
                assert reply["delta"] is True, reply
                await asyncio.sleep(0.005 * (n % 7))
                await ws.send(json.dumps({"op": "unsubscribe", "channel": "doc.busy", "id": -n}))
                frames = []
                while (frame := await recv_json(ws))["op"] != "unsubscribed":
                    frames.append(frame)
                received += len(frames)
                problems += [f"round {n}: {p}" for p in delta_problems(reply, frames)]
        return received, problems

    async with client(gateway.ws_url) as plain:
        await request(plain, {"op": "subscribe", "channel": "doc.busy", "id": 1})
        publisher = asyncio.create_task(publish())
        try:
            results = await asyncio.gather(*(churn(60) for _ in range(3)))
        finally:
            stop.set()
            await publisher
    problems = [problem for _, result in results for problem in result]
    assert problems == [], (len(problems), problems[:10])
    assert all(received > 50 for received, _ in results), results
    assert "Traceback" not in gateway.logs()


async def test_every_live_message_after_a_delta_subscription_comes_as_text(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """One rule from the reply on: messages up to the reply's offset (a replay, a state
    channel's latest) are ordinary frames, every later one is text, the first of them full.
    Before, on a channel with history that the replica did not carry yet, and on a state
    channel after its latest, the first live message came as an ordinary frame."""
    gateway = gateway_factory(
        {**DELTAS, "GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_STATE_CHANNELS": "doc.state"}
    )
    with Publisher(redis_server.url) as publisher:
        epochs = {}
        for channel in ("doc.log", "doc.state"):
            for version in (1, 2):  # history the replica has not carried
                epochs[channel] = publisher.append(channel, document(version)).epoch
        for since in (False, True):
            for channel in ("doc.log", "doc.state"):
                async with client(gateway.ws_url) as ws:
                    payload: dict[str, Any] = {"op": "subscribe", "channel": channel, "id": 1}
                    payload["delta"] = "fossil"
                    if since:
                        payload["since"] = {"offset": 1, "epoch": epochs[channel]}
                    reply = await request(ws, payload)
                    assert reply["delta"] is True, reply
                    top = reply["offset"]
                    for version in range(top + 1, top + 4):
                        publisher.publish(channel, document(version))
                    frames: list[dict[str, Any]] = []
                    while not frames or frames[-1].get("offset") != top + 3:
                        frames.append(await recv_json(ws))
                    where = f"{channel}, since: {since}"
                    assert delta_problems(reply, frames) == [], where
                    live = [f for f in frames if f["offset"] > top]
                    assert [f["delta"] for f in live] == [False, True, True], where
                    earlier = [f for f in frames if f["offset"] <= top]
                    assert all("delta" not in f for f in earlier), where


async def test_subscribing_again_answers_what_the_subscription_is(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(DELTAS)
    async with client(gateway.ws_url) as ws:
        first = await request(
            ws, {"op": "subscribe", "channel": "doc.a", "id": 1, "delta": "fossil"}
        )
        again = await request(ws, {"op": "subscribe", "channel": "doc.a", "id": 2})
        assert (first["delta"], again["delta"]) == (True, True)
        plain = await request(ws, {"op": "subscribe", "channel": "doc.b", "id": 3})
        asked = await request(
            ws, {"op": "subscribe", "channel": "doc.b", "id": 4, "delta": "fossil"}
        )
        assert "delta" not in plain and "delta" not in asked
        await request(ws, {"op": "publish", "channel": "doc.a", "data": {"a": 1}, "id": 5})
        message = await recv_json(ws)
        assert message["delta"] is False and message["data"] == '{"a":1}'
