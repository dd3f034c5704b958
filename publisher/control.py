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

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from publisher.envelope import MID_PATTERN, TRACEPARENT_PATTERN, TRACESTATE_MAX_LENGTH, Channel

__all__ = [
    "ACK_LUA",
    "ACK_TTL_MS",
    "CONTROL_CHANNEL",
    "RESERVED_PREFIX",
    "Ack",
    "ControlError",
    "ControlRequest",
    "ControlResult",
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
        default=None, description="the channel (unsubscribe and subscribe only)"
    )
    code: int = Field(
        default=1008,
        description="disconnect only: the close code, 1000, 1008, or 3000 to 4999 "
        "(4001 is the gateway's token expiry)",
    )
    reason: str = Field(
        default="disconnected by the service",
        description=f"disconnect only: the close reason, at most {MAX_REASON_BYTES} UTF-8 bytes",
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
        if self.op == "disconnect":
            if not (self.code in (1000, 1008) or 3000 <= self.code <= 4999):
                raise ValueError("code must be 1000, 1008, or 3000 to 4999")
            if len(self.reason.encode()) > MAX_REASON_BYTES:
                raise ValueError(f"reason is over {MAX_REASON_BYTES} UTF-8 bytes")
        elif self.channel is None:
            raise ValueError(f"{self.op} needs a channel")
        elif self.channel.startswith(RESERVED_PREFIX):
            raise ValueError("channels starting with @@ are the gateway's own")
        return self

    @model_validator(mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # Python's True == 1 would let `"v": true` through; JSON Schema's const does not.
        if isinstance(value, dict) and isinstance(value.get("v"), bool):
            raise ValueError("v must be the number 1")
        return value


class Ack(BaseModel):
    """One replica's answer to a request with an ``id``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    replica: str = Field(description="the replica that answered")
    connections: int = Field(ge=0, description="connections of the user it acted on")


@dataclass(frozen=True, slots=True)
class ControlResult:
    """What came back of one request."""

    #: Replicas (subscribers of the control channel) that received it.
    replicas: int
    #: Of those, how many acknowledged before the timeout.
    acknowledged: int
    #: Connections of the user the acknowledging replicas acted on.
    connections: int

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

    __slots__ = ("acknowledged", "connections")

    def __init__(self) -> None:
        self.acknowledged = 0
        self.connections = 0

    def add(self, payload: bytes) -> None:
        ack = parse_ack(payload)
        self.acknowledged += 1
        self.connections += ack.connections

    def result(self, replicas: int) -> ControlResult:
        return ControlResult(replicas, self.acknowledged, self.connections)


def parse_control(payload: bytes | str) -> ControlRequest:
    """Validate an encoded request (raises pydantic's ValidationError)."""
    return _request_adapter.validate_json(payload, strict=True)


def parse_ack(payload: bytes | str) -> Ack:
    return _ack_adapter.validate_json(payload)


def control_json_schema() -> dict[str, Any]:
    return _request_adapter.json_schema(mode="validation")
