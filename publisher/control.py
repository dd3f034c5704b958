"""Control requests: what a service asks of every gateway replica about one user. Pure.

A service publishes a request on the reserved channel ``<prefix>@@control`` (``PUBLISH``, or
``SPUBLISH`` on a Redis Cluster). Every replica subscribes to it, acts on the connections of
``user`` (the token's ``sub``) it holds, and, when the request has an ``id``, pushes one
acknowledgement onto the list ``<prefix>@@ack.<id>`` (kept for :data:`ACK_TTL_MS`), saying how
many of its connections it reached. The publisher counts the receivers of its PUBLISH and pops
as many acknowledgements (``BLPOP``) as it is willing to wait for.

Clients can neither subscribe nor publish to a channel starting with ``@@``
(:data:`RESERVED_PREFIX`), so nobody but a service with Redis access can send one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from publisher.envelope import MID_PATTERN, TRACEPARENT_PATTERN, TRACESTATE_MAX_LENGTH, Channel

__all__ = [
    "ACK_LUA",
    "ACK_TTL_MS",
    "CONTROL_CHANNEL",
    "MAX_REQUEST_BYTES",
    "RESERVED_PREFIX",
    "Ack",
    "ControlError",
    "ControlRequest",
    "ControlResult",
    "RefusedControl",
    "Tally",
    "ack_key",
    "build_control",
    "control_json_schema",
    "parse_ack",
    "parse_control",
]

#: Channels starting with it belong to the gateway; no client may subscribe or publish there.
RESERVED_PREFIX = "@@"
CONTROL_CHANNEL = RESERVED_PREFIX + "control"
#: How long an acknowledgement list outlives its last push: a publisher that gave up waiting
#: leaves nothing behind for longer.
ACK_TTL_MS = 60_000
#: Longest close reason a close frame can carry, in UTF-8 bytes (RFC 6455 section 5.5).
MAX_REASON_BYTES = 123
#: A token's ``sub``, as the gateway reads it.
USER_MAX_LENGTH = 256
#: The largest request a replica reads, bytes: every request of the schema's fields fits,
#: however it escapes them (12 KiB with every character a \uXXXX pair); a larger one (only
#: unknown fields can make it so) is refused unread and not acknowledged, so a flood of
#: megabytes costs a replica nothing and its queue holds at most 16 MiB.
MAX_REQUEST_BYTES = 16384


#: How a replica acknowledges: KEYS[1] the ack list, ARGV[1] the acknowledgement, ARGV[2] the
#: list's time to live in ms. One script, so that a list never outlives its expiry.
ACK_LUA = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def ack_key(prefix: str, request_id: str) -> str:
    """The Redis list the replicas push their acknowledgements of ``request_id`` onto."""
    return f"{prefix}{RESERVED_PREFIX}ack.{request_id}"


class ControlRequest(BaseModel):
    """One request to every replica. Unknown fields are ignored, as in envelopes."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="wsgateway control request",
        json_schema_extra={
            "description": "Published on Redis channel <prefix>@@control (prefix default 'ws:') "
            "as UTF-8 JSON; every gateway replica acts on the connections of `user` it holds."
        },
    )

    v: Literal[1] = Field(description="control request version")
    op: Literal["disconnect", "unsubscribe", "subscribe"] = Field(
        description="disconnect: close every connection of the user; unsubscribe/subscribe: "
        "take every connection of the user off `channel`, or put it on"
    )
    user: str = Field(
        min_length=1, max_length=USER_MAX_LENGTH, description="the user: their token's `sub`"
    )
    channel: Channel | None = Field(
        default=None,
        description="the channel (unsubscribe and subscribe only, which need one); not one "
        "starting with @@, the gateway's own",
        json_schema_extra={"not": {"type": "string", "pattern": "^@@"}},
    )
    code: int = Field(
        default=1008,
        description="disconnect only: the close code, 1000, 1008, or 3000 to 4999 "
        "(4001 is the gateway's token expiry)",
        json_schema_extra={"anyOf": [{"enum": [1000, 1008]}, {"minimum": 3000, "maximum": 4999}]},
    )
    reason: str = Field(
        default="disconnected by the service",
        max_length=MAX_REASON_BYTES,
        description=f"disconnect only: the close reason, at most {MAX_REASON_BYTES} characters "
        f"(a close frame carries {MAX_REASON_BYTES} UTF-8 bytes: a longer encoding is cut at a "
        "character boundary)",
    )
    traceparent: str | None = Field(
        default=None,
        pattern=TRACEPARENT_PATTERN,
        description="W3C traceparent of the service's span: the replicas' spans link to it",
    )
    tracestate: str | None = Field(
        default=None, max_length=TRACESTATE_MAX_LENGTH, description="W3C tracestate"
    )
    id: str | None = Field(
        default=None,
        pattern=MID_PATTERN,
        description="request id (printable ASCII, 1 to 128): when given, each replica pushes "
        "an acknowledgement onto the list <prefix>@@ack.<id>",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ControlRequest:
        # Checked whatever the op, as the JSON Schema states them: one rule per field.
        if not (self.code in (1000, 1008) or 3000 <= self.code <= 4999):
            raise ValueError("code must be 1000, 1008, or 3000 to 4999")
        if self.channel is not None and self.channel.startswith(RESERVED_PREFIX):
            raise ValueError("channels starting with @@ are the gateway's own")
        if self.op != "disconnect" and self.channel is None:
            raise ValueError(f"{self.op} needs a channel")
        return self

    @property
    def close_reason(self) -> str:
        """``reason`` as a close frame can carry it: cut to 123 UTF-8 bytes, whole
        characters."""
        return self.reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")

    @model_validator(mode="before")
    @classmethod
    def _numbers_as_json_schema_reads_them(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        # Python's True == 1 would let `"v": true` through; JSON Schema's const does not.
        if isinstance(value.get("v"), bool):
            raise ValueError("v must be the number 1")
        # JSON Schema counts 1008.0 (or 1.008e3) as the integer 1008: so do the replicas.
        whole = {
            name: int(number)
            for name in ("v", "code")
            if isinstance(number := value.get(name), float) and number.is_integer()
        }
        return {**value, **whole} if whole else value


class Ack(BaseModel):
    """One replica's answer to a request with an ``id``: what it did, or why it refused."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    replica: str = Field(description="the replica that answered")
    connections: int = Field(ge=0, description="connections of the user it acted on")
    error: str | None = Field(
        default=None, description="why the request was refused (then nothing was done)"
    )


@dataclass(frozen=True, slots=True)
class ControlResult:
    """What came back of one request."""

    #: Replicas (subscribers of the control channel) that received it.
    replicas: int
    #: Of those, how many acknowledged before the timeout.
    acknowledged: int
    #: Connections of the user the acknowledging replicas acted on.
    connections: int
    #: Why replicas refused it (one entry per refusing replica; none when all acted on it).
    errors: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Every replica that received the request answered."""
        return self.acknowledged >= self.replicas


_request_adapter: TypeAdapter[ControlRequest] = TypeAdapter(ControlRequest)
_ack_adapter: TypeAdapter[Ack] = TypeAdapter(Ack)


class ControlError(ValueError):
    """A control request cannot be sent as given (no such op, bad user, channel or code)."""


def build_control(
    op: str,
    user: str,
    *,
    channel: str | None = None,
    code: int | None = None,
    reason: str | None = None,
    request_id: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> bytes:
    """Validate and encode one request; raise :class:`ControlError` on any bad input."""
    fields: dict[str, Any] = {"v": 1, "op": op, "user": user, "channel": channel}
    if code is not None:
        fields["code"] = code
    if reason is not None:
        fields["reason"] = reason
    fields["id"] = request_id
    fields["traceparent"] = traceparent
    fields["tracestate"] = tracestate or None
    try:
        request = ControlRequest.model_validate(fields, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise ControlError(f"invalid {where}: {first['msg']}") from None
    return request.model_dump_json(exclude_defaults=True).encode()


class Tally:
    """The acknowledgements of one request, as they are popped."""

    __slots__ = ("acknowledged", "connections", "errors")

    def __init__(self) -> None:
        self.acknowledged = 0
        self.connections = 0
        self.errors: list[str] = []

    def add(self, payload: bytes) -> None:
        try:
            ack = parse_ack(payload)
        except ValidationError as exc:  # not a replica's: someone else wrote to the list
            ack = Ack(replica="?", connections=0, error=f"unreadable acknowledgement: {exc}")
        self.acknowledged += 1
        self.connections += ack.connections
        if ack.error is not None:
            self.errors.append(ack.error)

    def result(self, replicas: int) -> ControlResult:
        return ControlResult(replicas, self.acknowledged, self.connections, tuple(self.errors))


class RefusedControl(ValueError):
    """A request the replicas refuse: ``str()`` says why; ``request_id`` is its ``id`` when
    one can be read (a string of the id's pattern, given once), which a replica then
    acknowledges with the reason."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


_id_re = re.compile(r"[\x21-\x7e]{1,128}")  # MID_PATTERN, whole string (no newline at the end)


def _members(payload: bytes | str) -> tuple[Any, str | None]:
    """The JSON value of ``payload``, and the first member name found twice in an object
    (whose value a decoder would pick as it likes), if any."""
    twice: list[str] = []

    def record(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        members = dict(pairs)
        if len(members) != len(pairs) and not twice:
            seen: set[str] = set()
            for name, _ in pairs:
                if name in seen:
                    twice.append(name)
                    break
                seen.add(name)
        return members

    return json.loads(payload, object_pairs_hook=record), (twice[0] if twice else None)


def parse_control(payload: bytes | str) -> ControlRequest:
    """Validate an encoded request; raise :class:`RefusedControl` saying why not."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise RefusedControl(f"over {MAX_REQUEST_BYTES} bytes")
    try:
        value, twice = _members(payload)
    except RecursionError:
        raise RefusedControl("nested too deeply") from None
    except ValueError as exc:  # not JSON, not UTF-8
        raise RefusedControl(f"not JSON: {exc}") from None
    request_id = None
    if isinstance(value, dict) and twice != "id":
        found = value.get("id")
        if isinstance(found, str) and _id_re.fullmatch(found):
            request_id = found
    if twice is not None:
        raise RefusedControl(f"member {twice!r} given twice", request_id)
    try:
        return _request_adapter.validate_json(payload, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise RefusedControl(f"{where}: {first['msg']}", request_id) from None


def parse_ack(payload: bytes | str) -> Ack:
    return _ack_adapter.validate_json(payload)


def control_json_schema() -> dict[str, Any]:
    schema = _request_adapter.json_schema(mode="validation")
    # The one rule between fields: subscribe and unsubscribe name a channel.
    schema["allOf"] = [
        {
            "if": {"properties": {"op": {"enum": ["subscribe", "unsubscribe"]}}},
            "then": {"required": ["channel"], "properties": {"channel": {"type": "string"}}},
        }
    ]
    schema["description"] += (
        f" At most {MAX_REQUEST_BYTES} bytes; a member given twice is refused (which JSON "
        "Schema cannot state)."
    )
    return schema
