"""Protocol v1 over real sockets against a real replica on the embedded memory backplane."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Opcode

from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RawClient,
    client,
    expect_silence,
    recv_json,
    request,
    rss_kib,
)


async def test_subscribe_at_connect_and_by_request(memory_gateway: GatewayProcess) -> None:
    async with client(memory_gateway.ws_url + "?channels=news,sports") as ws:
        replies = [await recv_json(ws), await recv_json(ws)]
        assert replies == [
            {"op": "subscribed", "channel": "news"},
            {"op": "subscribed", "channel": "sports"},
        ]
        assert await request(ws, {"op": "subscribe", "channel": "chat", "id": 1}) == {
            "op": "subscribed",
            "channel": "chat",
            "id": 1,
        }
        # Subscribing twice is harmless and answered the same way.
        assert await request(ws, {"op": "subscribe", "channel": "chat", "id": 2}) == {
            "op": "subscribed",
            "channel": "chat",
            "id": 2,
        }
        assert await request(ws, {"op": "unsubscribe", "channel": "chat", "id": 3}) == {
            "op": "unsubscribed",
            "channel": "chat",
            "id": 3,
        }
        assert await request(ws, {"op": "ping", "id": 4}) == {"op": "pong", "id": 4}


async def test_publish_from_a_client_reaches_subscribers_only(
    memory_gateway: GatewayProcess,
) -> None:
    async with (
        client(memory_gateway.ws_url + "?channels=chat") as alice,
        client(memory_gateway.ws_url + "?channels=other") as bob,
        client(memory_gateway.ws_url) as carol,
    ):
        await recv_json(alice)
        await recv_json(bob)
        data = {"text": "hello", "n": [1, 2.5, None]}
        assert await request(
            carol, {"op": "publish", "channel": "chat", "data": data, "id": 7}
        ) == {"op": "published", "id": 7}
        received = await recv_json(alice)
        assert received["op"] == "message"
        assert received["channel"] == "chat"
        assert received["data"] == data
        assert isinstance(received["mid"], str) and received["mid"]
        assert isinstance(received["ts"], int)
        await expect_silence(bob)
        await expect_silence(carol)


async def test_publish_is_refused_where_not_allowed(memory_gateway: GatewayProcess) -> None:
    async with client(memory_gateway.ws_url + "?channels=news") as ws:
        await recv_json(ws)
        reply = await request(ws, {"op": "publish", "channel": "news", "data": 1, "id": 8})
        assert reply["op"] == "error" and reply["code"] == "forbidden" and reply["id"] == 8
        await expect_silence(ws)  # and nothing was delivered


@pytest.mark.parametrize(
    ("frame", "code", "request_id"),
    [
        ("{not json", "bad_request", None),
        ('{"op":"teleport","id":1}', "unknown_op", 1),
        ('{"op":"subscribe","id":2}', "bad_request", 2),
        ('{"op":"subscribe","channel":"no spaces","id":3}', "bad_request", 3),
        ('{"op":"unsubscribe","channel":"","id":4}', "bad_request", 4),
        ('{"op":"publish","channel":"chat","id":5}', "bad_request", 5),
        ('{"op":"ping","id":"x"}', "bad_request", None),
        ("[]", "bad_request", None),
        ("", "bad_request", None),
        # What the decoders cannot handle is a bad request too, not a 1011.
        ('{"op":"ping","pad":' + "[" * 5000 + "]" * 5000 + "}", "bad_request", None),
        (
            '{"op":"publish","channel":"chat","id":6,"data":' + "[" * 400 + "]" * 400 + "}",
            "bad_request",
            6,
        ),
        ('{"op":"publish","channel":"chat","id":7,"data":' + "9" * 5000 + "}", "bad_request", 7),
        ('{"op":"publish","channel":"chat","id":8,"data":1e999}', "bad_request", 8),
    ],
)
async def test_bad_requests_get_an_error_and_the_connection_stays_open(
    memory_gateway: GatewayProcess, frame: str, code: str, request_id: int | None
) -> None:
    async with client(memory_gateway.ws_url) as ws:
        reply = await request(ws, frame)
        assert reply["op"] == "error"
        assert reply["code"] == code
        assert reply["id"] == request_id
        assert isinstance(reply["message"], str) and reply["message"]
        assert await request(ws, {"op": "ping", "id": 99}) == {"op": "pong", "id": 99}


async def test_binary_frame_closes_with_1003(memory_gateway: GatewayProcess) -> None:
    async with client(memory_gateway.ws_url) as ws:
        await ws.send(b"\x00\x01")
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1003


def test_a_text_frame_that_is_not_utf8_closes_with_1007(memory_gateway: GatewayProcess) -> None:
    raw = RawClient(memory_gateway.ws_url)
    try:
        raw.send_text(b'{"op":"ping","id":"\xff\xfe"}')
        frames = raw.read_frames(timeout=5)
    finally:
        raw.close()
    assert [f.opcode for f in frames] == [Opcode.CLOSE]
    assert Close.parse(frames[0].data).code == 1007
    # Counted with the code the replica sent, though the client never answered it.
    assert (
        memory_gateway.metric(
            "wsgateway_connections_closed_total", websocket_close_code="1007", reason="protocol"
        )
        == 1
    )


async def test_a_request_sent_in_fragments_is_served(memory_gateway: GatewayProcess) -> None:
    """A message may come in several frames (RFC 6455 5.4): the replica serves it whole."""
    async with client(memory_gateway.ws_url) as ws:
        await ws.send(['{"op":"ping",', '"id":', "7}"])
        assert await recv_json(ws) == {"op": "pong", "id": 7}
        # Text beyond ASCII, decoded whole: the channel name is refused, not the frame.
        await ws.send(['{"op":"unsubscribe","channel":"\u00e9', '\u00e8","id":8}'])
        reply = await recv_json(ws)
        assert (reply["op"], reply["code"], reply["id"]) == ("error", "bad_request", 8)


def test_utf8_split_between_fragments_is_checked_whole(memory_gateway: GatewayProcess) -> None:
    """A character cut in two by a fragment boundary is valid; an invalid sequence in any
    fragment closes with 1007, as in one frame."""
    raw = RawClient(memory_gateway.ws_url)
    try:
        text = '{"op":"unsubscribe","channel":"é","id":3}'.encode()
        cut = text.index(b"\xc3") + 1
        raw.protocol.send_text(text[:cut], fin=False)
        raw.protocol.send_continuation(text[cut:], fin=True)
        raw.protocol.send_text(b'{"op":"ping",', fin=False)
        raw.protocol.send_continuation(b'"id":"\xff"}', fin=True)
        raw.sock.sendall(b"".join(raw.protocol.data_to_send()))
        frames = raw.read_frames(timeout=5)
    finally:
        raw.close()
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.CLOSE]
    reply = json.loads(bytes(frames[0].data))
    assert (reply["op"], reply["id"]) == ("error", 3)  # decoded and parsed: not 1007
    assert Close.parse(frames[1].data).code == 1007


async def test_a_binary_message_in_fragments_closes_with_1003(
    memory_gateway: GatewayProcess,
) -> None:
    async with client(memory_gateway.ws_url) as ws:
        await ws.send([b"\x00", b"\x01"])
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1003


async def test_unsubscribing_from_a_channel_never_subscribed_is_answered_unsubscribed(
    memory_gateway: GatewayProcess,
) -> None:
    async with client(memory_gateway.ws_url) as ws:
        reply = await request(ws, {"op": "unsubscribe", "channel": "never", "id": 5})
        assert reply == {"op": "unsubscribed", "channel": "never", "id": 5}
        assert await request(ws, {"op": "ping", "id": 6}) == {"op": "pong", "id": 6}


async def test_a_client_that_sends_but_never_reads_cannot_make_the_replica_hold_or_read_more(
    gateway_factory: GatewayFactory,
) -> None:
    """Requests as fast as the socket takes them, replies never read. While its transport is
    congested the replica does not read from it; its replies fill its queue and it is closed
    1013; flooding on instead of answering the close, it meets the rate limit, which counts
    frames while closing too: no longer read, reset a second later (not at the 30 s close
    timeout; before that fix this test ended at its own 10 s). The replica's memory hardly
    moves."""
    gateway = gateway_factory(
        {
            # A burst of 2,000 frames: its first replies fill the 256-reply queue well before.
            "GATEWAY_RATE_LIMIT": "2000",
            "GATEWAY_SEND_BUFFER": "4096",
            "GATEWAY_WRITE_LIMIT": "4096",
            "GATEWAY_CLOSE_TIMEOUT": "30",
        }
    )
    assert gateway.process is not None
    before = rss_kib(gateway.process.pid)
    raw = RawClient(gateway.ws_url, rcvbuf=4096)
    try:
        for n in range(1000):
            raw.protocol.send_text(json.dumps({"op": "ping", "id": n}).encode())
        chunk = b"".join(raw.protocol.data_to_send())  # 1,000 requests, ~35 KB
        raw.sock.setblocking(False)
        sent, started = 0, time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while time.monotonic() - started < 10:
                try:
                    sent += raw.sock.send(chunk)
                except BlockingIOError:  # the kernel's buffers are full: nobody reads them
                    await asyncio.sleep(0.01)
        ended = time.monotonic() - started
        assert ended < 5, ended  # reset, long before the close timeout
        assert sent < 32 * 1024 * 1024, sent
        # Closed for its replies' queue (1013), or, when the replica read a burst before its
        # transport filled (a loaded machine), for the rate limit first (1008).
        assert gateway.closed(1013) + gateway.closed(1008) == 1
        assert rss_kib(gateway.process.pid) - before < 8 * 1024
    finally:
        raw.close()


async def test_oversized_frame_closes_with_1009(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_MAX_MESSAGE_SIZE": "1024"})
    async with client(gateway.ws_url) as ws:
        assert (await request(ws, {"op": "ping", "id": 1, "pad": "x" * 900}))["op"] == "pong"
        await ws.send(json.dumps({"op": "ping", "pad": "x" * 2000}))
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1009
    # The replica is unharmed.
    async with client(gateway.ws_url) as ws:
        assert await request(ws, {"op": "ping", "id": 2}) == {"op": "pong", "id": 2}


async def test_subscription_limit(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_MAX_SUBSCRIPTIONS": "2"})
    async with client(gateway.ws_url + "?channels=a,b") as ws:
        await recv_json(ws)
        await recv_json(ws)
        reply = await request(ws, {"op": "subscribe", "channel": "c", "id": 1})
        assert (reply["code"], reply["id"]) == ("limit", 1)
        assert (await request(ws, {"op": "subscribe", "channel": "a", "id": 2}))[
            "op"
        ] == "subscribed"


async def test_anonymous_channel_allow_list(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_ANONYMOUS_CHANNELS": "public.*"})
    async with client(gateway.ws_url + "?channels=secret") as ws:
        reply = await recv_json(ws)
        assert (reply["op"], reply["code"]) == ("error", "forbidden")
        assert (await request(ws, {"op": "subscribe", "channel": "public.x", "id": 1}))[
            "op"
        ] == "subscribed"


@pytest.mark.parametrize("query", ["channels=bad%20name", "channels=a,,b", "channels=" + "x" * 129])
async def test_bad_channels_query_is_refused_at_the_handshake(
    memory_gateway: GatewayProcess, query: str
) -> None:
    with pytest.raises(InvalidStatus) as caught:
        async with client(f"{memory_gateway.ws_url}?{query}"):
            pass
    assert caught.value.response.status_code == 400
    assert b"invalid channel name" in caught.value.response.body


def test_a_request_that_is_not_valid_http_is_answered_400(
    memory_gateway: GatewayProcess,
) -> None:
    """websockets itself hangs up on these without a word; the replica answers them. A peer
    that leaves before its request ends (a TCP health check) is not one of them."""
    for partial in (b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection(("127.0.0.1", memory_gateway.port), timeout=5) as sock:
            sock.sendall(partial)
    request = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Origin: \x00\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", memory_gateway.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert answer.endswith(b"not a valid HTTP request\n")
    assert memory_gateway.metric("wsgateway_handshakes_refused_total", reason="malformed") == 1


def test_health_endpoints(memory_gateway: GatewayProcess) -> None:
    assert memory_gateway.http("/healthz") == (200, "ok\n")
    assert memory_gateway.http("/readyz") == (200, "ready\n")
    assert memory_gateway.http("/nope")[0] == 404
    assert memory_gateway.http("/")[0] == 200  # the demo page, on by default when embedded
    assert "backplane memory" in memory_gateway.logs()


async def test_garbage_on_the_socket_does_not_harm_the_replica(
    memory_gateway: GatewayProcess,
) -> None:
    for junk in (
        b"\x00" * 100,
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ):
        with socket.create_connection(("127.0.0.1", memory_gateway.port), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
    async with client(memory_gateway.ws_url) as ws:
        assert await request(ws, {"op": "ping", "id": 1}) == {"op": "pong", "id": 1}
    assert memory_gateway.running


async def test_many_requests_keep_their_order(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_RATE_LIMIT": "1000"})
    async with client(gateway.ws_url) as ws:
        for n in range(200):
            await ws.send(json.dumps({"op": "ping", "id": n}))
        ids = [(await recv_json(ws))["id"] for _ in range(200)]
        assert ids == list(range(200))
        await asyncio.sleep(0)


async def test_keepalive_closes_a_client_that_stops_answering_pings(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(
        {
            "GATEWAY_PING_INTERVAL": "0.3",
            "GATEWAY_PING_TIMEOUT": "0.3",
            "GATEWAY_CLOSE_TIMEOUT": "1",
        }
    )
    silent = RawClient(gateway.ws_url)  # never answers a ping
    try:
        async with client(gateway.ws_url) as healthy:
            frames = await asyncio.to_thread(silent.read_frames, 5.0)
            opcodes = [frame.opcode for frame in frames]
            assert Opcode.PING in opcodes
            assert opcodes[-1] is Opcode.CLOSE
            assert Close.parse(frames[-1].data).code == 1011
            # The healthy client answered every ping and is still open.
            assert (await request(healthy, {"op": "ping", "id": 2}))["id"] == 2
    finally:
        silent.close()
