"""Client protocol v1, without sockets: every request, reply and error of DESIGN.md section 2."""

from __future__ import annotations

import json

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.envelope import decode_envelope
from gateway.protocol import (
    ErrorCode,
    Ping,
    Publish,
    Refresh,
    RequestError,
    Subscribe,
    Unsubscribe,
    error,
    message,
    parse_channel_list,
    parse_request,
    refreshed,
    reply,
)
from publisher.envelope import is_valid_channel


def parse_frame(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"op":"subscribe","channel":"news","id":1}', Subscribe("news", 1)),
        ('{"op":"unsubscribe","channel":"news","id":2}', Unsubscribe("news", 2)),
        ('{"op":"ping","id":4}', Ping(4)),
        ('{"op":"ping"}', Ping(None)),
        ('{"op":"refresh","token":"a.b.c","id":5}', Refresh("a.b.c", 5)),
        ('{"op":"subscribe","channel":"a-b_c.d:e@f/g"}', Subscribe("a-b_c.d:e@f/g", None)),
        # Other requests ignore members they do not know; a subscribe's options are checked.
        ('{"id":7,"op":"ping","extra":true}', Ping(7)),
        ('{"op":"subscribe","channel":"s","latest":true}', Subscribe("s", latest=True)),
    ],
)
def test_valid_requests(text: str, expected: object) -> None:
    assert parse_request(text) == expected


def test_publish_keeps_data_bytes() -> None:
    request = parse_request('{"op":"publish","channel":"chat","data":{"b": [1, 2.50]},"id":3}')
    assert isinstance(request, Publish)
    assert bytes(request.data) == b'{"b": [1, 2.50]}'
    assert request.id == 3


@pytest.mark.parametrize(
    ("text", "code", "request_id"),
    [
        ("not json", ErrorCode.BAD_REQUEST, None),
        ("", ErrorCode.BAD_REQUEST, None),
        ('{"op":"subscribe","channel":"news"', ErrorCode.BAD_REQUEST, None),
        ("[1,2]", ErrorCode.BAD_REQUEST, None),
        ("0 x", ErrorCode.BAD_REQUEST, None),  # wrong type first, then not JSON at all
        ('{"op":1} trailing', ErrorCode.BAD_REQUEST, None),
        ('"subscribe"', ErrorCode.BAD_REQUEST, None),
        ("null", ErrorCode.BAD_REQUEST, None),
        ('{"channel":"news","id":5}', ErrorCode.BAD_REQUEST, 5),
        ('{"op":"dance","id":6}', ErrorCode.UNKNOWN_OP, 6),
        ('{"op":42,"id":6}', ErrorCode.UNKNOWN_OP, 6),
        ('{"op":"subscribe","id":8}', ErrorCode.BAD_REQUEST, 8),
        ('{"op":"subscribe","channel":7,"id":8}', ErrorCode.BAD_REQUEST, 8),
        ('{"op":"subscribe","channel":"","id":9}', ErrorCode.BAD_REQUEST, 9),
        ('{"op":"subscribe","channel":"has space","id":9}', ErrorCode.BAD_REQUEST, 9),
        ('{"op":"subscribe","channel":"news\\n","id":9}', ErrorCode.BAD_REQUEST, 9),
        ('{"op":"subscribe","channel":"' + "x" * 129 + '","id":9}', ErrorCode.BAD_REQUEST, 9),
        ('{"op":"subscribe","channel":"caf\\u00e9","id":9}', ErrorCode.BAD_REQUEST, 9),
        ('{"op":"publish","channel":"chat","id":10}', ErrorCode.BAD_REQUEST, 10),
        ('{"op":"ping","id":"eleven"}', ErrorCode.BAD_REQUEST, None),
        ('{"op":"ping","id":1.5}', ErrorCode.BAD_REQUEST, None),
        ('{"op":"ping","id":true}', ErrorCode.BAD_REQUEST, None),
        ('{"op":"ping","id":9007199254740993}', ErrorCode.BAD_REQUEST, None),
        ('{"op":"refresh","id":12}', ErrorCode.BAD_REQUEST, 12),
        ('{"op":"refresh","token":"","id":13}', ErrorCode.BAD_REQUEST, 13),
        ('{"op":"refresh","token":["a"],"id":14}', ErrorCode.BAD_REQUEST, 14),
        ('{"id":7,"channel":"x","op":"subscribe","extra":true}', ErrorCode.BAD_REQUEST, 7),
        ('{"op":"subscribe","channel":"x","latest":1,"id":15}', ErrorCode.BAD_REQUEST, 15),
    ],
)
def test_bad_requests(text: str, code: ErrorCode, request_id: int | None) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(text)
    assert caught.value.code is code
    assert caught.value.request_id == request_id
    assert caught.value.message


def test_channel_name_of_128_characters_is_valid() -> None:
    assert parse_request('{"op":"subscribe","channel":"' + "x" * 128 + '"}') == Subscribe("x" * 128)


def test_channel_list() -> None:
    assert parse_channel_list("a,b,a") == ["a", "b"]
    for bad in ("a,,b", "a b", "a,", "x" * 129):
        with pytest.raises(ValueError, match="invalid channel name"):
            parse_channel_list(bad)


def test_replies() -> None:
    assert json.loads(reply("subscribed", 1, "news").text) == {
        "op": "subscribed",
        "channel": "news",
        "id": 1,
    }
    assert json.loads(reply("pong", None).text) == {"op": "pong"}
    assert json.loads(reply("published", 3).text) == {"op": "published", "id": 3}
    assert json.loads(error(RequestError(ErrorCode.LIMIT, "too many", None)).text) == {
        "op": "error",
        "id": None,
        "code": "limit",
        "message": "too many",
    }


def test_message_frame_is_one_unmasked_text_frame_with_data_as_published() -> None:
    raw = b'{"v":1,"channel":"news","data":{"z": 1, "a": [1.10, "\\u00e9"]},"mid":"m-1","ts":17}'
    item = message(decode_envelope(raw, "news"))
    assert item.text == (
        b'{"op":"message","channel":"news","data":{"z": 1, "a": [1.10, "\\u00e9"]},'
        b'"mid":"m-1","ts":17}'
    )
    frame = parse_frame(item.frame)
    assert frame.opcode is Opcode.TEXT and frame.fin
    assert frame.data == item.text
    assert item.frame[1] & 0x80 == 0  # server frames are never masked
    assert len(item) == len(item.frame)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_frame_lengths(size: int) -> None:
    raw = json.dumps({"v": 1, "channel": "c", "data": "x" * size, "mid": "m", "ts": 0}).encode()
    item = message(decode_envelope(raw, "c"))
    assert parse_frame(item.frame).data == item.text


@pytest.mark.parametrize(
    ("channel", "valid"),
    [
        ("room{7}.chat", True),
        ("{room7}", True),
        ("a{b}c", True),
        ("a{}b", False),  # an empty tag is no tag
        ("a{b}{c}", False),  # one tag at most
        ("a}b{c", False),
        ("a{b", False),
        ("{", False),
        ("a{b c}", False),
    ],
)
def test_channel_names_may_carry_one_hash_tag(channel: str, valid: bool) -> None:
    assert is_valid_channel(channel) is valid


def test_refresh_replies() -> None:
    assert refreshed(5, 1767225600.0).text == b'{"op":"refreshed","id":5,"exp":1767225600}'
    assert refreshed(None, 1767225600.5).text == b'{"op":"refreshed","exp":1767225600.5}'
    taken = reply("unsubscribed", None, "user.alice.inbox", reason="forbidden").text
    assert taken == b'{"op":"unsubscribed","channel":"user.alice.inbox","reason":"forbidden"}'
