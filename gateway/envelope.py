"""Decode envelopes received from the backplane, once per message per replica.

The contract (field rules, limits) lives in :mod:`publisher.envelope`; this module is the
gateway's fast reader of it. ``data`` is kept as the raw JSON bytes the publisher sent, so it
reaches clients exactly as published without being decoded and re-encoded.
``tests/test_envelope.py`` checks that this reader and the pydantic model accept the same
envelopes.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from publisher.envelope import (
    MAX_ENVELOPE_BYTES,
    TRACESTATE_MAX_LENGTH,
    is_valid_epoch,
    is_valid_mid,
    is_valid_traceparent,
)

__all__ = ["EVENTS", "MAX_BYTES", "Envelope", "EventData", "MalformedEnvelope", "decode_envelope"]

#: The largest envelope the gateway takes by default: the publishers' limit, plus room for
#: the offset and epoch a history append adds.
MAX_BYTES = MAX_ENVELOPE_BYTES + 1024


class Envelope(msgspec.Struct, frozen=True):
    """A valid envelope of either version, as the hub uses it."""

    channel: str
    data: msgspec.Raw
    mid: str
    ts: int
    traceparent: str | None = None
    tracestate: str | None = None
    #: The message's place in its history channel (version 2 only), else None.
    offset: int | None = None
    epoch: str | None = None
    #: A replica's join or leave event (gateway.presence): ``data`` lists the members.
    event: str | None = None


#: What ``event`` may say. Publishers never set it: replicas do, for presence.
EVENTS = ("join", "leave")


class EventData(msgspec.Struct):
    """The ``data`` of a join or leave event: the members named, and how many more there
    were (announced by count only: a storm)."""

    members: list[msgspec.Raw]
    more: Annotated[int, msgspec.Meta(ge=0)] = 0


_event_data = msgspec.json.Decoder(EventData)


class _Wire(msgspec.Struct):
    """What a publisher sends, as decoded before the checks that msgspec cannot express."""

    v: int | float  # JSON Schema's "const": 1 admits 1.0 too; checked below
    channel: str
    data: msgspec.Raw
    mid: str
    ts: Annotated[int, msgspec.Meta(ge=0)]
    traceparent: str | None = None
    tracestate: Annotated[str, msgspec.Meta(max_length=TRACESTATE_MAX_LENGTH)] | None = None
    # Version 2 only; left raw so that a version 1 envelope ignores them whatever they hold,
    # as the contract says of fields a version does not know.
    # (An empty Raw is an absent field: msgspec cannot decode a Raw inside an Optional.)
    event: str | None = None
    offset: msgspec.Raw = msgspec.Raw(b"")
    epoch: msgspec.Raw = msgspec.Raw(b"")


class MalformedEnvelope(ValueError):
    """The payload is not a valid envelope for the channel it arrived on.

    ``reason`` is a short, fixed token (safe as a metric attribute); the message says more.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_decoder = msgspec.json.Decoder(_Wire)
_position = msgspec.json.Decoder(tuple[Annotated[int, msgspec.Meta(ge=1)], str])


def decode_envelope(payload: bytes, channel: str, max_bytes: int = MAX_BYTES) -> Envelope:
    """Decode ``payload`` received on ``channel`` (without prefix) or raise MalformedEnvelope.

    Whatever the decoder cannot handle is malformed too: more than ``max_bytes``, JSON
    nested deeper than the interpreter's recursion limit allows (about 1,000 levels).
    """
    if len(payload) > max_bytes:
        raise MalformedEnvelope("size", f"{len(payload)} bytes, over the {max_bytes}-byte limit")
    try:
        # msgspec does not check the UTF-8 inside a Raw span; clients would close on it (1007).
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedEnvelope("encoding", f"not UTF-8: {exc}") from None
    try:
        wire = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise MalformedEnvelope("schema", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedEnvelope("json", str(exc)) from None
    except RecursionError:
        raise MalformedEnvelope("depth", "JSON nested too deeply") from None
    if wire.v not in (1, 2) or type(wire.v) is bool:
        raise MalformedEnvelope("schema", f"unsupported envelope version {wire.v!r}")
    if wire.channel != channel:
        raise MalformedEnvelope(
            "channel", f"envelope names channel {wire.channel!r} but arrived on {channel!r}"
        )
    if not is_valid_mid(wire.mid):
        raise MalformedEnvelope("schema", "mid must be 1 to 128 printable ASCII characters")
    if wire.traceparent is not None and not is_valid_traceparent(wire.traceparent):
        raise MalformedEnvelope("schema", "traceparent is not a W3C traceparent")
    if wire.event is not None:
        if wire.event not in EVENTS:
            raise MalformedEnvelope("schema", "event must be join or leave")
        try:
            _event_data.decode(wire.data)
        except msgspec.ValidationError as exc:
            raise MalformedEnvelope("schema", f"an event's data: {exc}") from None
    offset = epoch = None
    if wire.v == 2:
        if not wire.offset or not wire.epoch:
            raise MalformedEnvelope("schema", "a version 2 envelope needs offset and epoch")
        try:
            offset, epoch = _position.decode(b"[%s,%s]" % (wire.offset, wire.epoch))
        except msgspec.ValidationError as exc:
            raise MalformedEnvelope("schema", f"offset or epoch: {exc}") from None
        if not is_valid_epoch(epoch):
            raise MalformedEnvelope("schema", "epoch must be 1 to 64 of A-Z a-z 0-9 _ -")
    return Envelope(
        wire.channel,
        wire.data,
        wire.mid,
        wire.ts,
        wire.traceparent,
        wire.tracestate,
        offset,
        epoch,
        wire.event,
    )
