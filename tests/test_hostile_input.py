"""Property-based tests: arbitrary frames, JSON, channel names, query strings, headers and
Redis payloads thrown at a real gateway (real sockets, real Redis).

Whatever arrives, the replica answers with a documented error or close code, keeps no task,
session or subscription of a client that left, and a well-behaved client on the same replica
receives every message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError, validators
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.harness import RedisServer, ThreadedGateway, envelope, wait_until

ERROR_CODES = {"bad_request", "unknown_op", "forbidden", "limit", "unavailable"}
REPLIES = {"subscribed", "unsubscribed", "pong", "published"}
CLOSE_CODES = {1000, 1001, 1003, 1007, 1008, 1009, 1011, 1013, 4001}
HANDSHAKE_STATUSES = {101, 400, 401, 403, 404, 503}
MAX_SIZE = 4096

EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Replica:
    """The gateway under attack, a Redis publisher, and a watcher that must miss nothing."""

    def __init__(self, workdir: Path) -> None:
        self.redis_server = RedisServer(workdir / "redis")
        self.redis_server.start()
        self.gateway = ThreadedGateway(
            redis_url=self.redis_server.url,
            rate_limit=1_000_000,  # the rate limit has its own test; here every frame counts
            max_message_size=MAX_SIZE,
            anonymous_publish="pub.*",
            open_timeout=2,
            log_level="warning",
        ).start()
        self.publisher = redis.Redis.from_url(self.redis_server.url)
        self.watcher = connect(self.gateway.ws_url + "?channels=sentinel", open_timeout=5)
        self.watcher.__enter__()
        assert json.loads(self.watcher.recv(5))["op"] == "subscribed"
        self.sentinels = 0
        self.baseline_tasks = self.gateway.tasks()

    def connect(self, query: str = "") -> ClientConnection:
        return connect(self.gateway.ws_url + query, open_timeout=5, max_size=None)

    def check(self) -> None:
        """The watcher gets a fresh message; nothing of departed clients is left behind."""
        self.sentinels += 1
        self.publisher.publish("ws:sentinel", envelope("sentinel", self.sentinels))
        got = json.loads(self.watcher.recv(5))
        assert (got["op"], got["data"]) == ("message", self.sentinels)
        gateway = self.gateway
        wait_until(lambda: gateway.call(lambda: len(gateway.gateway.sessions)) == 1, timeout=5)
        wait_until(lambda: gateway.tasks() == self.baseline_tasks, timeout=5)
        assert gateway.call(lambda: gateway.gateway.hub.channels) == 1
        assert self.redis_server.pubsub_channels() == {"ws:sentinel"}

    def close(self) -> None:
        self.watcher.close()
        self.publisher.close()
        self.gateway.stop()
        self.redis_server.stop()


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    replica = Replica(tmp_path_factory.mktemp("hostile"))
    yield replica
    replica.close()


def exchange(ws: ClientConnection, frames: list[str | bytes]) -> int | None:
    """Send ``frames`` then a ping; check every answer; return the close code if closed."""
    try:
        for frame in frames:
            ws.send(frame)
        ws.send('{"op":"ping","id":-7}')
        while True:
            answer = json.loads(ws.recv(5))
            if answer["op"] == "pong" and answer.get("id") == -7:
                return None
            if answer["op"] == "error":
                assert answer["code"] in ERROR_CODES, answer
                assert isinstance(answer["message"], str)
                assert answer["id"] is None or isinstance(answer["id"], int)
            else:
                assert answer["op"] in REPLIES | {"message"}, answer
    except ConnectionClosed:
        assert ws.close_code in CLOSE_CODES, ws.close_code
        return ws.close_code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
channels = st.one_of(
    st.text(max_size=140),
    st.from_regex(r"[A-Za-z0-9_.:@/\-{}]{1,128}", fullmatch=True),  # braces valid only as a tag
    st.sampled_from(["sentinel", "pub.x", "news", "", "a b", "x" * 129, "@alice", "@"]),
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "refresh"])
        | json_values,
        "channel": channels | json_values,
        "token": st.text(max_size=40) | json_values,
        "data": json_values,
        "id": st.integers() | json_values,
    },
)


@EXAMPLES
@given(
    st.lists(
        st.text(max_size=200) | st.text(min_size=MAX_SIZE - 10, max_size=MAX_SIZE + 10), max_size=5
    )
)
def test_arbitrary_text_frames(replica: Replica, frames: list[str]) -> None:
    with replica.connect() as ws:
        code = exchange(ws, list(frames))
        if code is not None:
            assert code == 1009 and any(len(f.encode()) > MAX_SIZE for f in frames)
    replica.check()


@EXAMPLES
@given(st.lists(requests, max_size=6))
def test_arbitrary_requests(replica: Replica, batch: list[dict[str, Any]]) -> None:
    with replica.connect() as ws:
        assert exchange(ws, [json.dumps(r) for r in batch]) is None
    replica.check()


@EXAMPLES
@given(channels)
def test_arbitrary_channel_names(replica: Replica, channel: str) -> None:
    with replica.connect() as ws:
        ws.send(json.dumps({"op": "subscribe", "channel": channel, "id": 1}))
        answer = json.loads(ws.recv(5))
        plain = channel.replace("{", "").replace("}", "")
        tag_ok = (channel.count("{"), channel.count("}")) == (0, 0) or (
            channel.count("{") == channel.count("}") == 1
            and channel.index("{") + 1 < channel.index("}")
        )
        valid = (
            1 <= len(channel) <= 128
            and tag_ok
            and all(c.isascii() and (c.isalnum() or c in "_.:@/-") for c in plain)
        )
        # A valid name starting with "@" is someone's personal channel: never an anonymous
        # client's (docs/protocol.md), so refused as forbidden rather than as bad_request.
        personal = valid and channel.startswith("@")
        assert answer["op"] == ("subscribed" if valid and not personal else "error"), (
            channel,
            answer,
        )
        if answer["op"] == "error":
            assert answer["code"] == ("forbidden" if personal else "bad_request"), (channel, answer)
        assert answer["id"] == 1
    replica.check()


@EXAMPLES
@given(st.binary(min_size=0, max_size=100))
def test_binary_frames_close_with_1003(replica: Replica, data: bytes) -> None:
    with replica.connect() as ws:
        assert exchange(ws, [data]) == 1003
    replica.check()


def handshake(port: int, target: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """A hand-made upgrade request; returns the status code of the answer (the gateway answers
    every request it reads with a status line; hanging up instead fails the test)."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    request += b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    request += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    request += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n" not in response:
            chunk = sock.recv(4096)
            assert chunk, f"hung up without a status: {request!r}"
            response += chunk
    return int(response.split(b" ", 2)[1])


query_text = st.text(
    st.characters(codec="ascii", exclude_characters=" \r\n\x00#"), max_size=80
) | st.sampled_from(
    [
        "channels=",
        "channels=a,,b",
        "channels=%ff",
        "token=",
        "token=x.y.z",
        "channels=news&channels=a%20b",
        "&&&",
        "channels=" + "a," * 200,
    ]
)


@EXAMPLES
@given(query_text)
def test_arbitrary_query_strings(replica: Replica, query: str) -> None:
    status = handshake(replica.gateway.gateway.port, b"/ws?" + query.encode(), [])
    assert status in HANDSHAKE_STATUSES, (query, status)
    replica.check()


header_names = st.sampled_from(
    [
        b"Origin",
        b"Authorization",
        b"Cookie",
        b"X-Forwarded-For",
        b"Sec-WebSocket-Protocol",
        b"Sec-WebSocket-Extensions",
        b"Sec-WebSocket-Key",
        b"Content-Length",
        b"X-Junk",
    ]
)
header_values = st.binary(max_size=100).map(lambda b: bytes(c for c in b if c not in b"\r\n"))


@EXAMPLES
@given(st.lists(st.tuples(header_names, header_values), max_size=4))
def test_arbitrary_headers(replica: Replica, headers: list[tuple[bytes, bytes]]) -> None:
    status = handshake(replica.gateway.gateway.port, b"/ws", headers)
    assert status in HANDSHAKE_STATUSES, (headers, status)
    replica.check()


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """JSON Schema patterns are ECMA-262 regexes, where ``$`` matches only at the very end;
    Python's ``re`` (which jsonschema uses) also matches before a final newline."""
    if validator.is_type(instance, "string"):
        ecma = pattern.removesuffix("$") + r"\Z" if pattern.endswith("$") else pattern
        if not re.search(ecma, instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")


SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "envelope.schema.json").read_text())
EnvelopeValidator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})
NOTHING = object()


def documented_data(payload: bytes, channel: str) -> Any:
    """What the docs say a subscriber of ``channel`` gets for ``payload`` published on it:
    ``data`` of a UTF-8 JSON envelope valid against docs/envelope.schema.json that names
    ``channel``; NOTHING otherwise. Independent of the gateway's own decoder."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except ValueError:
        return NOTHING
    if not EnvelopeValidator(SCHEMA).is_valid(value) or value["channel"] != channel:
        return NOTHING
    return value["data"]


redis_payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "v": st.sampled_from([1, 2, "1"]),
            "channel": st.sampled_from(["fuzz", "other"]),
            "data": json_values,
            "mid": st.text(max_size=10),
            "ts": st.integers(),
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@EXAMPLES
@given(st.lists(redis_payloads, min_size=1, max_size=5))
def test_arbitrary_bytes_on_the_redis_channel(replica: Replica, payloads: list[bytes]) -> None:
    with replica.connect("?channels=fuzz") as ws:
        assert json.loads(ws.recv(5))["op"] == "subscribed"
        expected = []
        for payload in payloads:
            replica.publisher.publish("ws:fuzz", payload)
            if (data := documented_data(payload, "fuzz")) is not NOTHING:
                expected.append(data)
        replica.publisher.publish("ws:fuzz", envelope("fuzz", "end"))
        delivered = []
        while (message := json.loads(ws.recv(5)))["data"] != "end":
            assert (message["op"], message["channel"]) == ("message", "fuzz")
            delivered.append(message["data"])
        assert delivered == expected
    replica.check()


def nested(depth: int, inner: str = "1") -> str:
    """JSON nested ``depth`` arrays deep."""
    return "[" * depth + inner + "]" * depth


def test_json_nested_10000_deep_gets_a_clear_answer_from_every_decoder(
    redis_server: RedisServer, gateway_factory: Any
) -> None:
    """Every decoder of client, token, control and Redis input, at 10,000 levels (or the
    deepest its size bound lets through): a documented answer, the connection and the
    replica go on, no traceback. Before, a subscribe with an unknown member nested 1,000
    deep made the second decode of request parsing raise RecursionError: 1011 and a
    traceback per frame."""
    from tests.test_security import SECRET, b64, token

    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_LOG_LEVEL": "info",
        }
    )
    good = token(channels=["*"], publish=["*"])
    # A token signed with the secret whose claims nest 2,800 deep: 7.5 KB, under the 8 KB
    # a request line may be. Signed, so that the claims are decoded at all.
    claims = '{"sub":"alice","exp":9999999999,"x":' + nested(2800) + "}"
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(claims.encode())
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    deep_token = signing_input + "." + b64(signature)
    assert len(deep_token) < 8000
    status, body = gateway.http(f"/ws?token={deep_token}")
    with connect(f"{gateway.ws_url}?token={good}", open_timeout=5) as ws:
        ws.send(json.dumps({"op": "subscribe", "channel": "deep", "id": 1}))
        assert json.loads(ws.recv(5))["op"] == "subscribed"
        for frame in (
            '{"op":"subscribe","channel":"a","id":2,"x":' + nested(10_000) + "}",
            '{"op":"subscribe","channel":"a","id":3,"x":'
            + '{"a":' * 10_000
            + "1"
            + "}" * 10_000
            + "}",
            '{"op":"publish","channel":"deep","id":4,"data":' + nested(10_000) + "}",
            nested(10_000),
            '{"op":"refresh","id":5,"token":"' + deep_token + '"}',
        ):
            ws.send(frame)
            answer = json.loads(ws.recv(5))
            assert answer["op"] == "error" and answer["code"] in ("bad_request", "forbidden"), (
                answer
            )
            assert "deep" in answer["message"] or "depth" in answer["message"], answer
        # Redis: an envelope 10,000 deep (in its data, and in a member nobody knows).
        publisher = redis.Redis.from_url(redis_server.url)
        for payload in (
            b'{"v":1,"channel":"deep","mid":"m","ts":1,"data":' + nested(10_000).encode() + b"}",
            b'{"v":1,"channel":"deep","mid":"m","ts":1,"data":1,"x":'
            + nested(10_000).encode()
            + b"}",
        ):
            assert publisher.publish("ws:deep", payload) == 1
        publisher.publish("ws:deep", envelope("deep", "after"))
        assert json.loads(ws.recv(5))["data"] == "after"
        # Control: 8,000 deep fits in the 16 KiB a request may be; 10,000 is refused unread.
        for depth in (8_000, 10_000):
            request_ = '{"v":1,"op":"disconnect","user":"alice","id":"d","x":' + nested(depth) + "}"
            publisher.publish("ws:@@control", request_)
        wait_until(
            lambda: (
                gateway.metric("wsgateway_control_requests_total", op="-", result="malformed") == 2
            )
        )
        ws.send('{"op":"ping","id":6}')
        assert json.loads(ws.recv(5)) == {"op": "pong", "id": 6}
        publisher.close()
    assert status == 401 and "depth" in body, (status, body)
    assert gateway.metric("wsgateway_messages_malformed_total", reason="depth") == 2
    assert "Traceback" not in gateway.logs()
