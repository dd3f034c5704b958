"""The publishing contract: the envelope every message travels in through Redis.

A message for channel ``C`` is a ``PUBLISH`` on Redis channel ``<prefix>C`` of the UTF-8 JSON
encoding of an envelope: version 1 (:class:`EnvelopeV1`), or version 2 (:class:`EnvelopeV2`),
which is version 1 plus the ``offset`` and ``epoch`` of a history channel's message, written by
the append script of :mod:`publisher.history`. This module is the single source of the rules
(channel names, identifier and size limits); the gateway's fast decoder reuses these constants,
and ``docs/envelope.schema.json`` is generated from :data:`Envelope`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any, Literal, Self

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "CHANNEL_MAX_LENGTH",
    "CHANNEL_PATTERN",
    "EPOCH_PATTERN",
    "MAX_ENVELOPE_BYTES",
    "MID_MAX_LENGTH",
    "TRACEPARENT_PATTERN",
    "Envelope",
    "EnvelopeError",
    "EnvelopeV1",
    "EnvelopeV2",
    "build_envelope",
    "check_channel",
    "is_valid_channel",
    "is_valid_epoch",
    "is_valid_mid",
    "is_valid_traceparent",
    "new_mid",
    "parse_envelope",
]

CHANNEL_MAX_LENGTH = 128
#: 1 to 128 characters from ``A-Z a-z 0-9 _ . : @ / -`` (DESIGN.md section 2), with at most
#: one ``{hash tag}`` (a ``{``, at least one of those characters, a ``}``): on a Redis Cluster
#: channels with the same tag live on the same node (docs/cluster.md).
CHANNEL_PATTERN = r"^[A-Za-z0-9_.:@/\-]*(\{[A-Za-z0-9_.:@/\-]+\}[A-Za-z0-9_.:@/\-]*)?$"
MID_MAX_LENGTH = 128
MID_PATTERN = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces: safe in logs and headers
#: W3C trace context ``version-traceid-parentid-flags``.
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
TRACESTATE_MAX_LENGTH = 512
#: A history channel's epoch: changes whenever its stream is lost and offsets restart.
EPOCH_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
#: Default ceiling on one encoded envelope; larger messages belong in object storage.
MAX_ENVELOPE_BYTES = 1024 * 1024

_channel_re = re.compile(CHANNEL_PATTERN)


class EnvelopeError(ValueError):
    """A message cannot be published as given (bad channel, bad id, too large, not JSON)."""


_mid_re = re.compile(MID_PATTERN)
_traceparent_re = re.compile(TRACEPARENT_PATTERN)
_epoch_re = re.compile(EPOCH_PATTERN)


# fullmatch, not the patterns' "$": Python's "$" also matches before a trailing newline.
def is_valid_channel(channel: object) -> bool:
    return (
        isinstance(channel, str)
        and 1 <= len(channel) <= CHANNEL_MAX_LENGTH
        and _channel_re.fullmatch(channel) is not None
    )


def is_valid_mid(mid: object) -> bool:
    return isinstance(mid, str) and _mid_re.fullmatch(mid) is not None


def is_valid_traceparent(value: object) -> bool:
    return isinstance(value, str) and _traceparent_re.fullmatch(value) is not None


def is_valid_epoch(value: object) -> bool:
    return isinstance(value, str) and _epoch_re.fullmatch(value) is not None


def check_channel(channel: object) -> str:
    if not is_valid_channel(channel):
        raise EnvelopeError(
            f"invalid channel name {channel!r}: 1 to {CHANNEL_MAX_LENGTH} characters "
            "from A-Z a-z 0-9 _ . : @ / -, with at most one non-empty {hash tag}"
        )
    assert isinstance(channel, str)
    return channel


Channel = Annotated[
    str,
    Field(
        pattern=CHANNEL_PATTERN,
        min_length=1,
        max_length=CHANNEL_MAX_LENGTH,
        description="channel name, without prefix",
    ),
]


class EnvelopeV1(BaseModel):
    """Version 1 of the envelope. Unknown fields are ignored so later versions can add some."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="wsgateway envelope v1",
        json_schema_extra={
            "description": "Published on Redis channel <prefix><channel> (prefix default 'ws:') "
            "as UTF-8 JSON; the gateway delivers `data` unchanged to every subscriber."
        },
    )

    v: Literal[1] = Field(description="envelope version")
    channel: Channel
    data: Any = Field(description="any JSON value, delivered as published")
    mid: str = Field(
        pattern=MID_PATTERN, description="unique message id (printable ASCII, 1 to 128)"
    )
    ts: int = Field(ge=0, description="publish time, unix milliseconds")
    traceparent: str | None = Field(
        default=None, pattern=TRACEPARENT_PATTERN, description="W3C traceparent of the publisher"
    )
    tracestate: str | None = Field(
        default=None, max_length=TRACESTATE_MAX_LENGTH, description="W3C tracestate"
    )
    event: Literal["join", "leave"] | None = Field(
        default=None,
        description="set by gateway replicas only, on their presence events, whose `data` is "
        '{"members": [<entry>, ...], "more": <count of members not listed, default 0>}; '
        "publishers leave it out",
    )

    @field_validator("data")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        # pydantic would write NaN as null and reads Infinity from JSON; neither is JSON.
        pending = [value]
        while pending:
            item = pending.pop()
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError("data contains NaN or Infinity, which JSON cannot carry")
            if isinstance(item, dict):
                pending.extend(item.values())
            elif isinstance(item, list | tuple | set | frozenset):
                pending.extend(item)
        return value

    @model_validator(mode="after")
    def _event_data(self) -> Self:
        # A replica's event names its members: {"members": [...], "more": <int >= 0>}.
        if self.event is not None:
            data = self.data
            more = data.get("more", 0) if isinstance(data, dict) else None
            if (
                not isinstance(data, dict)
                or not isinstance(data.get("members"), list)
                or type(more) is not int
                or more < 0
            ):
                raise ValueError('an event\'s data is {"members": [...], "more": <n >= 0>}')
        return self

    @field_validator("v", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # Python's True == 1 would let `"v": true` through; JSON Schema's const does not.
        if isinstance(value, bool):
            raise ValueError("v must be the number 1")
        return value


class EnvelopeV2(EnvelopeV1):
    """Version 2: a message of a history channel, numbered by the append script."""

    model_config = ConfigDict(
        title="wsgateway envelope v2",
        json_schema_extra={
            "description": "Version 1 plus the message's place in its channel's history: "
            "written by the history append script (publisher/history.py), never by hand."
        },
    )

    v: Literal[2] = Field(description="envelope version")  # type: ignore[assignment]
    offset: int = Field(ge=1, description="position in the channel's history, from 1")
    epoch: str = Field(
        pattern=EPOCH_PATTERN,
        description="the history's identity: a new epoch means offsets restarted",
    )


def _version(value: Any) -> str | None:
    version = value.get("v") if isinstance(value, dict) else getattr(value, "v", None)
    if isinstance(version, bool) or version not in (1, 2):
        return None  # JSON's true is not the number 1
    return str(int(version))


#: Either version, told apart by ``v``.
Envelope = Annotated[
    Annotated[EnvelopeV1, Tag("1")] | Annotated[EnvelopeV2, Tag("2")],
    Discriminator(
        _version,
        custom_error_type="envelope_version",
        custom_error_message="v must be 1 or 2",
    ),
]
_envelope_adapter: TypeAdapter[EnvelopeV1 | EnvelopeV2] = TypeAdapter(Envelope)


def parse_envelope(payload: bytes | str, *, strict: bool = False) -> EnvelopeV1 | EnvelopeV2:
    """Validate an encoded envelope of either version (raises pydantic's ValidationError).

    The text must be JSON as RFC 8259 defines it, as the gateway reads it: pydantic's parser
    also takes NaN and Infinity, even in a field the version ignores.
    """
    try:
        msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValidationError.from_exception_data(
            "Envelope",
            [{"type": "json_invalid", "loc": (), "input": payload, "ctx": {"error": str(exc)}}],
        ) from None
    return _envelope_adapter.validate_json(payload, strict=strict)


def envelope_json_schema() -> dict[str, Any]:
    return _envelope_adapter.json_schema(mode="validation")


def new_mid() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def build_envelope(
    channel: str,
    data: Any,
    *,
    mid: str | None = None,
    ts: int | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> bytes:
    """Validate and encode one envelope; raise :class:`EnvelopeError` on any bad input."""
    check_channel(channel)
    try:
        envelope = EnvelopeV1(
            v=1,
            channel=channel,
            data=data,
            mid=new_mid() if mid is None else mid,
            ts=now_ms() if ts is None else ts,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        encoded = envelope.model_dump_json(exclude_none=True).encode()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "envelope"
        raise EnvelopeError(f"invalid {field}: {first['msg']}") from None
    except (TypeError, ValueError) as exc:  # data that JSON cannot represent
        raise EnvelopeError(f"data is not JSON-serialisable: {exc}") from None
    if len(encoded) > max_bytes:
        raise EnvelopeError(f"envelope is {len(encoded)} bytes, over the {max_bytes}-byte limit")
    return encoded
