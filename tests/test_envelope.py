"""The envelope contract: the pydantic model, the gateway's fast reader, and the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.envelope import MAX_BYTES, MalformedEnvelope, decode_envelope
from publisher.envelope import EnvelopeError, build_envelope, parse_envelope
from publisher.schema import envelope_schema

SCHEMA_FILE = Path(__file__).parent.parent / "docs" / "envelope.schema.json"


def test_committed_schema_matches_the_model() -> None:
    assert SCHEMA_FILE.read_text() == envelope_schema(), (
        "docs/envelope.schema.json is stale: python -m publisher.schema > docs/envelope.schema.json"
    )


def test_build_and_decode_round_trip() -> None:
    data = {"price": 101.25, "tags": ["a", "é"], "n": None, "big": 2**70}
    encoded = build_envelope("prices.eur", data, mid="abc", ts=1234)
    envelope = decode_envelope(encoded, "prices.eur")
    assert json.loads(bytes(envelope.data)) == data
    assert (envelope.mid, envelope.ts, envelope.offset) == ("abc", 1234, None)


def test_build_generates_mid_and_ts() -> None:
    first = json.loads(build_envelope("c", 1))
    second = json.loads(build_envelope("c", 1))
    assert first["mid"] != second["mid"]
    assert first["ts"] > 1_700_000_000_000


@pytest.mark.parametrize(
    ("channel", "data", "kwargs", "match"),
    [
        ("bad channel", 1, {}, "invalid channel name"),
        ("", 1, {}, "invalid channel name"),
        ("x" * 129, 1, {}, "invalid channel name"),
        ("c", float("nan"), {}, "NaN"),
        ("c", [float("inf")], {}, "NaN or Infinity"),
        ("c", object(), {}, "not JSON-serialisable"),
        ("c", 1, {"mid": "has space"}, "invalid mid"),
        ("c", 1, {"mid": ""}, "invalid mid"),
        ("c", 1, {"ts": -1}, "invalid ts"),
        ("c", "x" * 2000, {"max_bytes": 1000}, "over the 1000-byte limit"),
        ("c", 1, {"traceparent": "nope"}, "invalid traceparent"),
    ],
)
def test_build_refuses_bad_input(
    channel: str, data: Any, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(EnvelopeError, match=match):
        build_envelope(channel, data, **kwargs)
    assert issubclass(EnvelopeError, ValueError)


GOOD = {"v": 1, "channel": "news", "data": {"a": 1}, "mid": "m", "ts": 5}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "encoding"),
        (b'{"v":1,"channel":"news","data":"\xff","mid":"m","ts":5}', "encoding"),
        (b"not json", "json"),
        (b'{"v":1,"channel":"news","data":1,"mid":"m","ts":5} trailing', "json"),
        (b'{"v":1,"channel":"news","data":NaN,"mid":"m","ts":5}', "json"),
        (b"[]", "schema"),
        (json.dumps({**GOOD, "v": 3}).encode(), "schema"),
        (json.dumps({**GOOD, "v": 2}).encode(), "schema"),  # version 2 without a position
        (json.dumps({**GOOD, "v": 2, "offset": 1}).encode(), "schema"),
        (json.dumps({**GOOD, "v": 2, "offset": 0, "epoch": "e"}).encode(), "schema"),
        (json.dumps({**GOOD, "v": 2, "offset": "1", "epoch": "e"}).encode(), "schema"),
        (json.dumps({**GOOD, "v": 2, "offset": 1, "epoch": "a b"}).encode(), "schema"),
        (json.dumps({**GOOD, "ts": -1}).encode(), "schema"),
        (json.dumps({**GOOD, "ts": "5"}).encode(), "schema"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "data"}).encode(), "schema"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "mid"}).encode(), "schema"),
        (json.dumps({**GOOD, "mid": "a b"}).encode(), "schema"),
        (json.dumps({**GOOD, "mid": "m\n"}).encode(), "schema"),
        (json.dumps({**GOOD, "traceparent": "00-xyz"}).encode(), "schema"),
        (json.dumps({**GOOD, "channel": "sports"}).encode(), "channel"),
        # What the decoder cannot handle.
        (json.dumps({**GOOD, "data": "x" * MAX_BYTES}).encode(), "size"),
        (
            b'{"v":1,"channel":"news","data":' + b"[" * 3000 + b"]" * 3000 + b',"mid":"m","ts":5}',
            "depth",
        ),
        (
            b'{"v":1,"channel":"news","data":'
            + b'{"a":' * 3000
            + b"1"
            + b"}" * 3000
            + b',"mid":"m","ts":5}',
            "depth",
        ),
    ],
)
def test_decode_refuses_malformed(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedEnvelope) as caught:
        decode_envelope(payload, "news")
    assert caught.value.reason == reason


def test_version_2_carries_offset_and_epoch() -> None:
    payload = json.dumps({**GOOD, "v": 2, "offset": 7, "epoch": "e-1"}).encode()
    envelope = decode_envelope(payload, "news")
    assert (envelope.offset, envelope.epoch) == (7, "e-1")
    model = parse_envelope(payload, strict=True)
    assert (model.v, getattr(model, "offset", None)) == (2, 7)


def test_version_1_ignores_a_position_like_any_unknown_field() -> None:
    payload = json.dumps({**GOOD, "offset": "junk", "epoch": 3}).encode()
    assert decode_envelope(payload, "news").offset is None
    assert parse_envelope(payload, strict=True).v == 1


@pytest.mark.parametrize(
    "field", ['"epoch":Infinity', '"future":NaN', '"data":-Infinity', '"data":{"a":[NaN]}']
)
def test_both_readers_refuse_what_is_not_json(field: str) -> None:
    """NaN and Infinity are not JSON, even in a field the version ignores (found by hypothesis)."""
    payload = b'{"v":1,"channel":"news","data":1,"mid":"m","ts":5,%s}' % field.encode()
    with pytest.raises(MalformedEnvelope):
        decode_envelope(payload, "news")
    with pytest.raises(ValidationError):
        parse_envelope(payload, strict=True)


def test_decode_ignores_unknown_fields() -> None:
    envelope = decode_envelope(json.dumps({**GOOD, "future": [1]}).encode(), "news")
    assert bytes(envelope.data) == b'{"a": 1}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
field_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            1,
            2,
            0,
            -1,
            "news",
            "",
            "a b",
            "m\n",
            "x" * 129,
            "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
            "00-" + "A" * 32 + "-" + "b" * 16 + "-01",
        ]
    ),
)
ALTERNATIVES: dict[str, st.SearchStrategy[Any]] = {
    "v": st.sampled_from([2, "1", 1.0, True]) | field_values,
    "channel": st.sampled_from(["sports", "news\n", "News"]) | field_values,
    "data": json_values,
    "mid": st.sampled_from(["id-9", "", "é", "x" * 128, "x" * 129, "a\tb"]) | field_values,
    "ts": st.sampled_from([0, -1, 2**63 - 1, 1.5, "5"]) | field_values,
    "traceparent": st.sampled_from([None, "00-" + "a" * 32 + "-" + "b" * 16 + "-01"])
    | field_values,
    "tracestate": st.sampled_from([None, "k=v", "x" * 513]) | field_values,
    "offset": st.sampled_from([1, 7, 0, -3, 2**53, 1.0, "4", True]) | field_values,
    "epoch": st.sampled_from(["e1", "ab_CD-9", "", "a b", "x" * 65, "é"]) | field_values,
    "event": st.sampled_from([None, "join", "leave", "Join", ""]) | field_values,
}
# An event's data is its members: a few right and wrong shapes of it, besides any JSON.
ALTERNATIVES["data"] = ALTERNATIVES["data"] | st.fixed_dictionaries(
    {"members": st.sampled_from([[], [{"client": "c"}], "x", None])},
    optional={"more": st.sampled_from([0, 3, -1, 1.0, True, "2"])},
)
VALID = {
    **GOOD,
    "traceparent": None,
    "tracestate": None,
    "offset": None,
    "epoch": None,
    "event": None,
}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope with a few fields dropped or replaced by something else."""
    candidate: dict[str, Any] = {}
    for name, strategy in ALTERNATIVES.items():
        fate = draw(st.sampled_from(["keep"] * 4 + ["drop", "replace"]))
        if fate == "keep" and (VALID[name] is not None or draw(st.booleans())):
            candidate[name] = VALID[name]
        elif fate == "replace":
            candidate[name] = draw(strategy)
    return candidate


@settings(max_examples=400, deadline=None)
@given(envelopes())
def test_gateway_reader_agrees_with_the_model(candidate: dict[str, Any]) -> None:
    """Whatever the model accepts the gateway delivers, and whatever it refuses is malformed."""
    payload = json.dumps(candidate).encode()
    try:
        model = parse_envelope(payload, strict=True)
        model_ok = model.channel == "news"
    except ValidationError:
        model_ok = False
    try:
        decode_envelope(payload, "news")
        reader_ok = True
    except MalformedEnvelope:
        reader_ok = False
    event(f"accepted: {model_ok}")
    assert reader_ok == model_ok, candidate
