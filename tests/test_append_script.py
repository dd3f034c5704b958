"""The history append script (publisher/lua/history_append.lua) on a real Redis: it takes any
valid JSON envelope, refuses what the gateways could not read, and stores a retry or a stale
version once at most."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.envelope import decode_envelope
from publisher.envelope import parse_envelope
from publisher.history import APPEND_LUA, Appended, HistoryPolicy, Outcome, append_keys
from tests.harness import RedisServer

POLICY = HistoryPolicy(("*",), idempotency_window=60)


class Script:
    """The script on one Redis, for one channel, with the arguments a publisher sends."""

    def __init__(self, r: Any, channel: str = "news") -> None:
        self.r = r
        self.channel = channel
        self.run = r.register_script(APPEND_LUA)
        self.keys = append_keys("ws:", channel)

    def args(self, envelope: bytes, **changes: Any) -> list[Any]:
        args = POLICY.append_args(
            "ws:" + self.channel,
            envelope,
            idempotency_key=changes.pop("key", None),
            version=changes.pop("version", None),
        )
        for index, value in changes.pop("argv", {}).items():
            args[index - 1] = value
        assert not changes
        return args

    def __call__(self, envelope: bytes, **changes: Any) -> Appended:
        keys = changes.pop("keys", self.keys)
        return Appended.from_reply(self.run(keys, self.args(envelope, **changes)))

    def stored(self) -> list[bytes]:
        return [fields[b"e"] for _, fields in self.r.xrange(self.keys[0])]


@pytest.fixture
def script(redis_server: RedisServer) -> Iterator[Script]:
    r = redis.Redis.from_url(redis_server.url)
    yield Script(r)
    r.close()


def _envelope(channel: str = "news", data: Any = None, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "channel": channel, "data": data, "mid": "m1", "ts": 5, **fields}


SPELLINGS = {
    "pretty": lambda e: json.dumps(e, indent=2).encode(),
    "keys sorted": lambda e: json.dumps(e, sort_keys=True).encode(),
    "keys reversed": lambda e: json.dumps(dict(reversed(list(e.items())))).encode(),
    "ascii escapes": lambda e: json.dumps(e, ensure_ascii=True).encode(),
    "utf-8": lambda e: json.dumps(e, ensure_ascii=False).encode(),
    "crlf and tabs": lambda e: json.dumps(e, indent="\t").replace("\n", "\r\n").encode(),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_any_spelling_of_a_valid_envelope_is_stored_as_the_gateways_read_it(
    script: Script, spelling: str
) -> None:
    data = {"text": 'héllo } ] " \\ 🎉', "n": [1, -2.5e-3, 0, True, None], "nested": {"a": []}}
    sent = _envelope(data=data, traceparent=None, extra={"kept": 1})
    appended = script(SPELLINGS[spelling](sent))
    assert (appended.offset, appended.outcome) == (1, Outcome.PUBLISHED)
    [stored] = script.stored()
    decoded = decode_envelope(stored, "news")
    assert (decoded.offset, decoded.epoch) == (1, appended.epoch)
    assert json.loads(bytes(decoded.data)) == data
    model = parse_envelope(stored, strict=True)
    assert (model.v, model.mid, model.ts) == (2, "m1", 5)
    assert json.loads(stored)["extra"] == {"kept": 1}  # fields a version does not know


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**60), 2**60)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    ),
    indent=st.sampled_from([None, 0, 1, 4]),
    sort_keys=st.booleans(),
)
def test_whatever_json_carries_reaches_the_gateways_as_sent(
    script: Script, data: Any, indent: int | None, sort_keys: bool
) -> None:
    text = json.dumps(_envelope(data=data), indent=indent, sort_keys=sort_keys).encode()
    script(text)
    stored = script.stored()[-1]
    assert json.loads(bytes(decode_envelope(stored, "news").data)) == data


REFUSED = [
    (b'{"v":1,"channel":"news","data":NaN,"mid":"m","ts":1}', "not JSON near"),
    (b'{"v":1,"channel":"news","data":[1,-Infinity],"mid":"m","ts":1}', "not JSON near"),
    (b'{"v":1,"channel":"news","data":0x10,"mid":"m","ts":1}', "not JSON near"),
    (b'{"v":1,"channel":"news","v":1,"data":1,"mid":"m","ts":1}', "member v twice"),
    (b'[{"v":1,"channel":"news","data":1,"mid":"m","ts":1}]', "not a JSON object"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":1} {}', "text after its object"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":1', "not a JSON object"),
    (b'{"v":1,"channel":"news","data":1 "mid":"m","ts":1}', "not a JSON object"),
    (b'{"v":1,"channel":"news","data":"a\x01b","mid":"m","ts":1}', "control character"),
    (b'{"v":1,"channel":"news","data":"\xff","mid":"m","ts":1}', "not UTF-8"),
    (b'{"v":1,"channel":"news","data":"\xed\xa0\x80","mid":"m","ts":1}', "not UTF-8"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":1.5}', "ts must be"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":"1"}', "ts must be"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":-1}', "ts must be"),
    (b'{"v":2,"channel":"news","data":1,"mid":"m","ts":1}', "v must be 1"),
    (b'{"v":true,"channel":"news","data":1,"mid":"m","ts":1}', "v must be 1"),
    (b'{"v":1,"channel":"sport","data":1,"mid":"m","ts":1}', "channel must be"),
    (b'{"v":1,"channel":"news","mid":"m","ts":1}', "needs data"),
    (b'{"v":1,"channel":"news","data":1,"mid":"a b","ts":1}', "mid must be"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":1,"traceparent":"x"}', "traceparent"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":1,"tracestate":7}', "tracestate"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":1,"offset":3}', "must not carry"),
    (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":1,"event":"join"}', "must not carry"),
    (b'{"v":1,"channel":"news","data":"%s","mid":"m","ts":1}' % (b"x" * 2**20), "over 1048576"),
]


@pytest.mark.parametrize(("envelope", "error"), REFUSED, ids=[e for _, e in REFUSED])
def test_what_the_gateways_could_not_read_is_refused_and_nothing_changes(
    script: Script, envelope: bytes, error: str
) -> None:
    with pytest.raises(redis.ResponseError, match=error):
        script(envelope)
    assert script.r.exists(*script.keys) == 0


def test_wrong_keys_or_arguments_are_refused(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    tagged = Script(r, "room{7}")
    good = json.dumps(_envelope("room{7}", 1)).encode()
    # The keys protocol.md once gave for every channel: a tagged one keeps its own tag.
    with pytest.raises(redis.ResponseError, match=r"keys must be ws:room\{7\}:history"):
        tagged(good, keys=["{ws:room{7}}:history", "{ws:room{7}}:meta"])
    for index, value in ((3, "0"), (4, "x"), (5, "")):
        with pytest.raises(redis.ResponseError, match=f"argument {index} must be"):
            tagged(good, argv={index: value})
    with pytest.raises(redis.ResponseError, match="epoch must be"):
        tagged(good, argv={6: "é"})
    with pytest.raises(redis.ResponseError, match="idempotency key must be"):
        tagged(good, key="has space")
    with pytest.raises(redis.ResponseError, match="idempotency window"):
        tagged(good, key="k", argv={9: "0"})
    with pytest.raises(redis.ResponseError, match="needs keys 3 and 4"):
        tagged(good, key="k", keys=tagged.keys[:2])
    for version in ("x", "-1", "1.5", str(2**53 + 1), "1e3", "07", " 1"):
        with pytest.raises(redis.ResponseError, match="version must be"):
            tagged(good, argv={10: version})
    assert r.exists(*tagged.keys) == 0
    assert tagged(good).offset == 1  # the same arguments, right: stored
    r.close()


def test_a_retry_with_the_same_idempotency_key_is_stored_and_sent_once(
    script: Script,
) -> None:
    subscriber = script.r.pubsub()
    subscriber.subscribe("ws:news")
    subscriber.get_message(timeout=1)
    first = script(json.dumps(_envelope(data="a")).encode(), key="order-1")
    retry = script(json.dumps(_envelope(data="a")).encode(), key="order-1")
    other = script(json.dumps(_envelope(data="b")).encode(), key="order-2")
    assert (first.offset, first.outcome, first.receivers) == (1, Outcome.PUBLISHED, 1)
    assert (retry.offset, retry.epoch, retry.outcome, retry.receivers) == (
        1,
        first.epoch,
        Outcome.DUPLICATE,
        0,
    )
    assert (other.offset, other.outcome) == (2, Outcome.PUBLISHED)
    assert len(script.stored()) == 2
    sent = [subscriber.get_message(timeout=1) for _ in range(3)]
    assert [json.loads(m["data"])["data"] for m in sent if m] == ["a", "b"]
    subscriber.close()


def test_an_idempotency_key_is_forgotten_after_its_window_and_records_stay_bounded(
    script: Script,
) -> None:
    window = HistoryPolicy(("*",), idempotency_window=0.2)
    envelope = json.dumps(_envelope(data=1)).encode()

    def append(key: str) -> Appended:
        args = window.append_args("ws:news", envelope, idempotency_key=key)
        return Appended.from_reply(script.run(script.keys, args))

    assert append("k").outcome is Outcome.PUBLISHED
    assert append("k").outcome is Outcome.DUPLICATE
    time.sleep(0.3)
    again = append("k")
    assert (again.offset, again.outcome) == (2, Outcome.PUBLISHED)
    assert [append(f"burst-{n}").outcome for n in range(200)] == [Outcome.PUBLISHED] * 200
    time.sleep(0.3)
    for n in range(10):  # each append clears up to 64 expired records: 201 in four
        append(f"late-{n}")
    _, _, records, expiries = script.keys
    assert script.r.hlen(records) == script.r.zcard(expiries) == 10
    assert 0 < script.r.pttl(records) <= POLICY.retention_ms


def test_a_version_not_above_the_channels_is_dropped_and_reported(script: Script) -> None:
    def state(data: int, version: int) -> Appended:
        return script(json.dumps(_envelope(data=data)).encode(), version=version)

    assert [(a.offset, a.outcome) for a in (state(1, 5), state(2, 5), state(3, 4))] == [
        (1, Outcome.PUBLISHED),
        (1, Outcome.STALE),
        (1, Outcome.STALE),
    ]
    assert (state(4, 6).offset, state(5, 0).outcome) == (2, Outcome.STALE)
    assert [json.loads(e)["data"] for e in script.stored()] == [1, 4]
    assert script(json.dumps(_envelope(data=6)).encode()).offset == 3  # no version: stored
    script.r.delete(script.keys[1])  # the history is lost: its version with it
    restarted = state(7, 1)
    assert (restarted.offset, restarted.outcome) == (1, Outcome.PUBLISHED)
