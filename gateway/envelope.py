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

from publisher.envelope import TRACESTATE_MAX_LENGTH, is_valid_mid, is_valid_traceparent

__all__ = ["Envelope", "MalformedEnvelope", "decode_envelope"]


class Envelope(msgspec.Struct, frozen=True):
    v: int | float  # JSON Schema's "const": 1 admits 1.0 too; checked below
    channel: str
    data: msgspec.Raw
    mid: str
    ts: Annotated[int, msgspec.Meta(ge=0)]
    traceparent: str | None = None
    tracestate: Annotated[str, msgspec.Meta(max_length=TRACESTATE_MAX_LENGTH)] | None = None


class MalformedEnvelope(ValueError):
    """The payload is not a valid envelope for the channel it arrived on.

    ``reason`` is a short, fixed token (safe as a metric attribute); the message says more.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_decoder = msgspec.json.Decoder(Envelope)


def decode_envelope(payload: bytes, channel: str) -> Envelope:
    """Decode ``payload`` received on ``channel`` (without prefix) or raise MalformedEnvelope."""
    try:
        # msgspec does not check the UTF-8 inside a Raw span; clients would close on it (1007).
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedEnvelope("encoding", f"not UTF-8: {exc}") from None
    try:
        envelope = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise MalformedEnvelope("schema", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedEnvelope("json", str(exc)) from None
    if envelope.v != 1:
        raise MalformedEnvelope("schema", f"unsupported envelope version {envelope.v!r}")
    if envelope.channel != channel:
        raise MalformedEnvelope(
            "channel", f"envelope names channel {envelope.channel!r} but arrived on {channel!r}"
        )
    if not is_valid_mid(envelope.mid):
        raise MalformedEnvelope("schema", "mid must be 1 to 128 printable ASCII characters")
    if envelope.traceparent is not None and not is_valid_traceparent(envelope.traceparent):
        raise MalformedEnvelope("schema", "traceparent is not a W3C traceparent")
    return envelope
