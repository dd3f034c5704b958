"""Client protocol version 1: requests, replies, message frames and close codes.

Pure and I/O-free. Requests are JSON text frames; every request may carry an integer ``id``
that is echoed in its reply. See ``docs/protocol.md`` for the full contract.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
from websockets.frames import Frame, Opcode

from gateway.envelope import Envelope, EventData
from publisher.envelope import CHANNEL_MAX_LENGTH, is_valid_channel, is_valid_epoch

__all__ = [
    "Close",
    "ErrorCode",
    "Outbound",
    "Ping",
    "PresenceRequest",
    "PresenceStats",
    "Publish",
    "Refresh",
    "Request",
    "RequestError",
    "Since",
    "Subscribe",
    "Text",
    "Unsubscribe",
    "error",
    "message",
    "parse_channel_list",
    "parse_request",
    "presence",
    "presence_stats",
    "refreshed",
    "reply",
    "subscribed",
]


class Close(enum.IntEnum):
    """Close codes the gateway sends, named for why it sends them."""

    NORMAL = 1000
    GOING_AWAY = 1001  # drain, shutdown
    BINARY_NOT_ACCEPTED = 1003
    POLICY_VIOLATION = 1008  # over the rate limit (every frame counts)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SLOW_CONSUMER = 1013  # try again later
    TOKEN_EXPIRED = 4001


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    FORBIDDEN = "forbidden"
    LIMIT = "limit"
    UNAVAILABLE = "unavailable"


class RequestError(Exception):
    """A request that gets an ``error`` reply; the connection stays open."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# JavaScript clients hold ids as doubles: keep them exactly representable.
RequestId = Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)]


class Since(msgspec.Struct, frozen=True):
    """The last message a client has of a history channel: resume after it."""

    offset: Annotated[int, msgspec.Meta(ge=0, le=2**53)]
    epoch: str


class Subscribe(
    msgspec.Struct, tag="subscribe", tag_field="op", frozen=True, forbid_unknown_fields=True
):
    """Options are checked: a misspelt one would otherwise silently do nothing."""

    channel: str
    id: RequestId | None = None
    since: Since | None = None
    #: The channel's newest message right after the reply (default: on state channels).
    latest: bool | None = None
    #: Live messages as Fossil deltas, on channels that allow them (gateway.deltas).
    delta: Literal["fossil"] | None = None


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="op", frozen=True):
    channel: str
    id: RequestId | None = None


class Publish(msgspec.Struct, tag="publish", tag_field="op", frozen=True):
    channel: str
    data: msgspec.Raw
    id: RequestId | None = None


class Ping(msgspec.Struct, tag="ping", tag_field="op", frozen=True):
    id: RequestId | None = None


class Refresh(msgspec.Struct, tag="refresh", tag_field="op", frozen=True):
    """A new token for this connection: same ``sub``, a later ``exp``, maybe other rights."""

    token: str
    id: RequestId | None = None


class PresenceRequest(msgspec.Struct, tag="presence", tag_field="op", frozen=True):
    """A page of who is on ``channel``: from ``cursor`` (``"0"``: the start), about
    ``limit`` members (at most the replica's presence page)."""

    channel: str
    id: RequestId | None = None
    # \Z, not $: msgspec searches with Python's re, where $ also matches before a final
    # newline ("5\n" would pass, and Redis would refuse it).
    cursor: Annotated[str, msgspec.Meta(max_length=64, pattern="^[0-9]+\\Z")] = "0"
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


class PresenceStats(msgspec.Struct, tag="presence_stats", tag_field="op", frozen=True):
    channel: str
    id: RequestId | None = None


Request = Subscribe | Unsubscribe | Publish | Ping | Refresh | PresenceRequest | PresenceStats
OPS = ("subscribe", "unsubscribe", "publish", "ping", "refresh", "presence", "presence_stats")

_request_decoder = msgspec.json.Decoder(Request)


def _request_id(raw: Any) -> int | None:
    value = raw.get("id") if isinstance(raw, dict) else None
    if type(value) is int and -(2**53) <= value <= 2**53:
        return value
    return None


def parse_request(text: str) -> Request:
    """Parse one client text frame; raise :class:`RequestError` with the code to reply with."""
    try:
        request: Request = _request_decoder.decode(text)
    except msgspec.ValidationError as exc:
        # The wrong shape: look again, loosely, for the id and the op. The typed decoder can
        # stop at the first wrong type before it sees that the rest is not JSON ("0 x").
        try:
            raw = msgspec.json.decode(text)
        except msgspec.DecodeError as invalid:
            raise RequestError(ErrorCode.BAD_REQUEST, f"not valid JSON: {invalid}") from None
        except RecursionError:  # an unknown member nested deeper than the decoder goes
            raise RequestError(ErrorCode.BAD_REQUEST, "JSON nested too deeply") from None
        request_id = _request_id(raw)
        if not isinstance(raw, dict):
            raise RequestError(
                ErrorCode.BAD_REQUEST, "a request is a JSON object", request_id
            ) from None
        op = raw.get("op")
        if op is None:
            raise RequestError(ErrorCode.BAD_REQUEST, "missing 'op'", request_id) from None
        if op not in OPS:
            raise RequestError(
                ErrorCode.UNKNOWN_OP,
                f"unknown op {str(op)[:64]!r}; expected one of {', '.join(OPS)}",
                request_id,
            ) from None
        raise RequestError(ErrorCode.BAD_REQUEST, str(exc), request_id) from None
    except msgspec.DecodeError as exc:
        raise RequestError(ErrorCode.BAD_REQUEST, f"not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(ErrorCode.BAD_REQUEST, "JSON nested too deeply") from None
    if isinstance(request, Refresh):
        if not request.token:
            raise RequestError(ErrorCode.BAD_REQUEST, "token must not be empty", request.id)
        return request
    if not isinstance(request, Ping) and not is_valid_channel(request.channel):
        raise RequestError(ErrorCode.BAD_REQUEST, _bad_channel(request.channel), request.id)
    if isinstance(request, PresenceRequest) and int(request.cursor) >= 2**64:
        # Redis cursors are unsigned 64-bit numbers: a larger one is the client's mistake.
        raise RequestError(ErrorCode.BAD_REQUEST, "cursor is not a presence cursor", request.id)
    if isinstance(request, Subscribe) and request.since and not is_valid_epoch(request.since.epoch):
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            "since.epoch must be 1 to 64 characters from A-Z a-z 0-9 _ -",
            request.id,
        )
    return request


def _bad_channel(channel: str) -> str:
    shown = channel if len(channel) <= 64 else channel[:64] + "..."
    return (
        f"invalid channel name {shown!r}: 1 to {CHANNEL_MAX_LENGTH} characters "
        "from A-Z a-z 0-9 _ . : @ / -, with at most one non-empty {hash tag}"
    )


def parse_channel_list(value: str) -> list[str]:
    """Parse the ``channels=a,b`` query parameter; raise ValueError naming the bad entry."""
    channels: list[str] = []
    for name in value.split(","):
        if not is_valid_channel(name):
            raise ValueError(_bad_channel(name))
        if name not in channels:
            channels.append(name)
    return channels


class Outbound:
    """One server-to-client text message, encoded once and shared by every recipient.

    ``frame`` is the complete unmasked WebSocket frame: server frames are never masked, so
    without compression the same bytes serve every subscriber. The text is not kept beside
    it (that would hold every message twice): :attr:`text` cuts it out of the frame when a
    compressed connection needs it.
    """

    __slots__ = ("__weakref__", "frame", "offset", "start", "ts")

    def __init__(self, text: bytes, ts: int | None = None, offset: int | None = None) -> None:
        self.frame = Frame(Opcode.TEXT, text).serialize(mask=False)
        self.start = len(self.frame) - len(text)  # where the text starts: after the header
        self.ts = ts  # publish time of a message (unix ms); None for replies
        self.offset = offset  # a history channel's message: its offset

    @property
    def text(self) -> bytes:
        return self.frame[self.start :]

    def __len__(self) -> int:
        return len(self.frame)


class Text(Outbound):
    """A message of a delta channel's chain as JSON text, for the subscribers that take
    deltas: its full text, or a delta against the chain's message before it, with the full
    text (``full``) to send instead when that message may not have reached the client.
    ``chain`` tells which channel's chain it belongs to (a queue that drops one of its
    messages sends the next as its full text)."""

    __slots__ = ("chain", "full")

    def __init__(
        self,
        text: bytes,
        ts: int | None,
        offset: int | None,
        chain: object,
        full: Text | None = None,
    ) -> None:
        super().__init__(text, ts, offset)
        self.chain = chain
        self.full = full


class _Message(msgspec.Struct):
    op: str
    channel: str
    data: msgspec.Raw
    mid: str
    ts: int


class _HistoryMessage(msgspec.Struct):
    op: str
    channel: str
    data: msgspec.Raw
    mid: str
    ts: int
    offset: int
    epoch: str


class _TextMessage(msgspec.Struct):
    """A message to a subscriber that negotiated deltas: ``data`` is the data's JSON text as
    a string (``delta`` false), or a Fossil delta against the previous one (``delta`` true)."""

    op: str
    channel: str
    data: str
    mid: str
    ts: int
    offset: int
    epoch: str
    delta: bool


class _Event(msgspec.Struct, omit_defaults=True):
    op: str
    channel: str
    members: list[msgspec.Raw]
    more: int = 0


_event_data = msgspec.json.Decoder(EventData)


class _Presence(msgspec.Struct):
    op: str
    channel: str
    id: int | None
    members: msgspec.Raw
    cursor: str


class _PresenceStats(msgspec.Struct):
    op: str
    channel: str
    id: int | None
    clients: int
    users: int


class _Reply(msgspec.Struct, omit_defaults=True):
    op: str
    channel: str | None = None
    id: int | None = None
    reason: str | None = None  # an unsubscribed the client did not ask for: why


class _Refreshed(msgspec.Struct, omit_defaults=True):
    op: str
    id: int | None = None
    exp: float | None = None


class _Subscribed(msgspec.Struct, omit_defaults=True):
    op: str
    channel: str
    id: int | None = None
    recovered: bool | None = None
    offset: int | None = None
    epoch: str | None = None
    latest: bool | None = None
    delta: bool | None = None


class _Error(msgspec.Struct):
    op: str
    id: int | None
    code: str
    message: str


_encode = msgspec.json.encode


def message(envelope: Envelope) -> Outbound:
    """The ``message`` frame for an envelope; ``data`` is copied byte for byte.

    A history channel's message carries its ``offset`` and ``epoch``; a replica's presence
    event is a ``join`` or ``leave`` frame listing the members.
    """
    if envelope.event is not None:
        data = _event_data.decode(envelope.data)  # its shape checked by decode_envelope
        return Outbound(_encode(_Event(envelope.event, envelope.channel, data.members, data.more)))
    if envelope.offset is None or envelope.epoch is None:
        return Outbound(
            _encode(
                _Message("message", envelope.channel, envelope.data, envelope.mid, envelope.ts)
            ),
            envelope.ts,
        )
    frame = _HistoryMessage(
        "message",
        envelope.channel,
        envelope.data,
        envelope.mid,
        envelope.ts,
        envelope.offset,
        envelope.epoch,
    )
    return Outbound(_encode(frame), envelope.ts, envelope.offset)


def text_message(
    envelope: Envelope, text: bytes, *, delta: bool, chain: object, full: Text | None = None
) -> Text:
    """The ``message`` frame of a history channel's message for a subscriber that takes
    deltas: ``text`` is the data's JSON text, or (``delta``) a Fossil delta making it from
    the chain's previous message, whose ``full`` text goes instead when the client may not
    hold that one."""
    assert envelope.offset is not None and envelope.epoch is not None
    frame = _TextMessage(
        "message",
        envelope.channel,
        text.decode(),
        envelope.mid,
        envelope.ts,
        envelope.offset,
        envelope.epoch,
        delta,
    )
    return Text(_encode(frame), envelope.ts, envelope.offset, chain, full)


def subscribed(
    channel: str,
    request_id: int | None,
    *,
    recovered: bool | None = None,
    offset: int | None = None,
    epoch: str | None = None,
    latest: bool = False,
    delta: bool = False,
) -> Outbound:
    """The ``subscribed`` reply; on a history channel with the position the client starts
    at (and, when it asked to resume, whether every missed message follows; ``latest``: the
    channel's newest message, at ``offset``, follows)."""
    return Outbound(
        _encode(
            _Subscribed(
                "subscribed",
                channel,
                request_id,
                recovered,
                offset,
                epoch,
                latest or None,
                delta or None,
            )
        )
    )


def reply(
    op: str, request_id: int | None, channel: str | None = None, reason: str | None = None
) -> Outbound:
    """``unsubscribed`` (with channel; with a reason when the client did not ask for it),
    ``published`` and ``pong``."""
    return Outbound(_encode(_Reply(op, channel, request_id, reason)))


def refreshed(request_id: int | None, expires_at: float | None) -> Outbound:
    """The ``refreshed`` reply: the connection now lives until ``exp`` (unix seconds)."""
    exp = int(expires_at) if expires_at is not None and expires_at.is_integer() else expires_at
    return Outbound(_encode(_Refreshed("refreshed", request_id, exp)))


def presence(channel: str, request_id: int | None, members: bytes, cursor: str) -> Outbound:
    """A page of members (a JSON array of entries) and where the next one starts ('0': no
    more)."""
    return Outbound(
        _encode(_Presence("presence", channel, request_id, msgspec.Raw(members), cursor))
    )


def presence_stats(channel: str, request_id: int | None, clients: int, users: int) -> Outbound:
    return Outbound(_encode(_PresenceStats("presence_stats", channel, request_id, clients, users)))


def error(exc: RequestError) -> Outbound:
    return Outbound(_encode(_Error("error", exc.request_id, exc.code.value, exc.message)))
