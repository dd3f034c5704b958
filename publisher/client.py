"""Sync and asyncio publishers: validate, encode, ``PUBLISH`` on ``<prefix><channel>``.

Each publish is a PRODUCER span ``send <channel>`` (when an OpenTelemetry SDK is configured)
whose context travels in the envelope as ``traceparent``/``tracestate``, so the gateways'
CONSUMER spans link back to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

from publisher.cluster import is_cluster_url, parse_cluster_url
from publisher.control import CONTROL_CHANNEL, ControlResult, Tally, ack_key, build_control
from publisher.envelope import (
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    build_envelope,
    check_channel,
    is_valid_mid,
    new_mid,
)
from publisher.history import APPEND_LUA, Appended, HistoryPolicy, Outcome, append_keys
from publisher.kinds import KINDS_KEY, ChannelKinds
from publisher.presence import PURGE, STATS_LUA, presence_keys
from publisher.presence import READ_LUA as PRESENCE_READ_LUA
from publisher.settings import PublisherSettings

__all__ = ["Appended", "AsyncPublisher", "Outcome", "Publisher"]

#: How long a control request waits for the replicas' acknowledgements by default, seconds.
CONTROL_TIMEOUT = 2.0


class _Base:
    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        max_envelope_bytes: int = MAX_ENVELOPE_BYTES,
        tracer_provider: trace.TracerProvider | None = None,
        history: HistoryPolicy | None = None,
    ) -> None:
        defaults = PublisherSettings()
        self.redis_url = redis_url or defaults.redis_url
        self.prefix = defaults.channel_prefix if prefix is None else prefix
        #: Which channels are appended to their stream and numbered, atomically with the
        #: PUBLISH (publisher.history): what the gateways wrote in Redis (publisher.kinds),
        #: else ``history``, else the PUBLISHER_HISTORY_* settings.
        self.kinds = ChannelKinds(defaults.history() if history is None else history)
        self._kinds_key = self.prefix + KINDS_KEY
        self.max_envelope_bytes = max_envelope_bytes
        self._tracer = trace.get_tracer("wsgateway.publisher", tracer_provider=tracer_provider)
        #: redis+cluster:// URLs publish with SPUBLISH to the node that serves the channel.
        self.sharded = is_cluster_url(self.redis_url)
        self._publish_command = "SPUBLISH" if self.sharded else "PUBLISH"

    @property
    def history(self) -> HistoryPolicy:
        return self.kinds.policy

    @contextmanager
    def _producing(
        self, name: str, destination: str, attributes: dict[str, str]
    ) -> Iterator[tuple[Span, dict[str, str]]]:
        """A PRODUCER span, current, and the carrier of its context for the request."""
        with self._tracer.start_as_current_span(
            name,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.destination.name": destination,
                **attributes,
            },
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            yield span, carrier

    @contextmanager
    def _sending(
        self, channel: str, data: Any, mid: str | None
    ) -> Iterator[tuple[Span, bytes, bytes]]:
        """Validate (raising EnvelopeError before anything reaches Redis), open the PRODUCER
        span, and yield it with the Redis channel and the envelope carrying its context."""
        check_channel(channel)
        mid = new_mid() if mid is None else mid
        with self._producing(f"send {channel}", channel, {"messaging.message.id": mid}) as (
            span,
            carrier,
        ):
            envelope = build_envelope(
                channel,
                data,
                mid=mid,
                traceparent=carrier.get("traceparent"),
                tracestate=carrier.get("tracestate") or None,
                max_bytes=self.max_envelope_bytes,
            )
            yield span, (self.prefix + channel).encode(), envelope

    def _append(
        self,
        channel: str,
        key: bytes,
        envelope: bytes,
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the history append script for one message."""
        return append_keys(self.prefix, channel), self.history.append_args(
            key.decode(),
            envelope,
            sharded=self.sharded,
            idempotency_key=idempotency_key,
            version=version,
        )

    def _check_append(self, idempotency_key: str | None, version: int | None) -> None:
        """Refuse, before anything reaches Redis, what the append script would refuse."""
        if idempotency_key is not None and not is_valid_mid(idempotency_key):
            raise EnvelopeError("idempotency key must be 1 to 128 printable ASCII characters")
        if version is not None and (type(version) is not int or not 0 <= version <= 2**53):
            raise EnvelopeError("version must be a whole number from 0 to 2^53")

    def _check_history(self, channel: str) -> None:
        if not self.history.applies(channel):
            raise EnvelopeError(
                f"channel {channel!r} keeps no history: idempotency keys and versions need "
                "a history channel"
            )

    @contextmanager
    def _controlling(
        self, op: str, user: str, timeout: float, **fields: Any
    ) -> Iterator[tuple[Span, bytes, bytes, str | None]]:
        """Validate (raising ControlError before anything reaches Redis), open the PRODUCER
        span, and yield it with the control channel, the request, and its ack list (None
        when nobody waits: ``timeout`` <= 0)."""
        request_id = new_mid() if timeout > 0 else None
        build_control(op, user, request_id=request_id, **fields)  # refused before the span
        with self._producing(
            f"control {op}", CONTROL_CHANNEL, {"wsgateway.control.op": op, "enduser.id": user}
        ) as (span, carrier):
            request = build_control(
                op,
                user,
                request_id=request_id,
                traceparent=carrier.get("traceparent"),
                tracestate=carrier.get("tracestate"),
                **fields,
            )
            acks = ack_key(self.prefix, request_id) if request_id is not None else None
            yield span, (self.prefix + CONTROL_CHANNEL).encode(), request, acks

    def _presence_args(self, channel: str, *extra: Any) -> tuple[list[str], list[Any]]:
        check_channel(channel)
        return presence_keys(self.prefix, channel), [PURGE, time.time_ns() // 1_000_000, *extra]

    @staticmethod
    def _members(entries: list[bytes]) -> list[dict[str, Any]]:
        return [json.loads(entry) for entry in entries]

    @staticmethod
    def _controlled(span: Span, result: ControlResult) -> ControlResult:
        span.set_attribute("wsgateway.receivers", result.replicas)
        span.set_attribute("wsgateway.control.acknowledged", result.acknowledged)
        span.set_attribute("wsgateway.control.connections", result.connections)
        return result

    @staticmethod
    def _appended(span: Span, reply: list[Any]) -> Appended:
        appended = Appended.from_reply(reply)
        span.set_attribute("wsgateway.history.offset", appended.offset)
        span.set_attribute("wsgateway.history.epoch", appended.epoch)
        span.set_attribute("wsgateway.history.outcome", appended.outcome.value)
        span.set_attribute("wsgateway.receivers", appended.receivers)
        return appended


class Publisher(_Base):
    """Blocking publisher for scripts and sync services."""

    def __init__(self, redis_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(redis_url, **kwargs)
        self._redis: Any
        if self.sharded:
            seeds, options = parse_cluster_url(self.redis_url)
            self._redis = redis.cluster.RedisCluster(
                startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in seeds],  # type: ignore[no-untyped-call]
                socket_connect_timeout=5,
                **options,
            )
        else:
            self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)
        self._append_script = self._redis.register_script(APPEND_LUA)
        self._read_presence = self._redis.register_script(PRESENCE_READ_LUA)
        self._presence_stats = self._redis.register_script(STATS_LUA)

    def publish(self, channel: str, data: Any, *, mid: str | None = None) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; return how many gateways got it."""
        with self._sending(channel, data, mid) as (span, key, envelope):
            self._follow_kinds()  # after the checks: bad input never reaches Redis
            if self.history.applies(channel):
                keys, args = self._append(channel, key, envelope)
                return self._appended(span, self._append_script(keys, args)).receivers
            receivers = int(self._redis.execute_command(self._publish_command, key, envelope))
            span.set_attribute("wsgateway.receivers", receivers)
            return receivers

    def append(
        self,
        channel: str,
        data: Any,
        *,
        mid: str | None = None,
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> Appended:
        """Publish ``data`` to history channel ``channel``; return its offset and epoch.

        With ``idempotency_key``, a retry within the idempotency window stores and sends
        nothing and returns the first message's offset (outcome ``DUPLICATE``). With
        ``version``, a message whose version is not above the channel's is dropped (outcome
        ``STALE``, with the channel's current offset). EnvelopeError when ``channel`` keeps
        no history or an argument is invalid.
        """
        self._check_append(idempotency_key, version)
        with self._sending(channel, data, mid) as (span, key, envelope):
            self._follow_kinds()
            self._check_history(channel)
            keys, args = self._append(channel, key, envelope, idempotency_key, version)
            return self._appended(span, self._append_script(keys, args))

    def _follow_kinds(self) -> None:
        """Re-read the gateways' channel kinds when they are due (every few seconds)."""
        now = time.monotonic()
        if self.kinds.due(now):
            self.kinds.update(self._redis.get(self._kinds_key), now)

    def disconnect(
        self,
        user: str,
        *,
        code: int | None = None,
        reason: str | None = None,
        timeout: float = CONTROL_TIMEOUT,
    ) -> ControlResult:
        """Close every connection of ``user`` (their tokens' ``sub``) on every replica, with
        ``code`` (default 1008) and ``reason``; wait up to ``timeout`` seconds for the
        replicas to say how many they closed (0: do not wait)."""
        return self._control("disconnect", user, timeout, code=code, reason=reason)

    def subscribe(
        self, user: str, channel: str, *, timeout: float = CONTROL_TIMEOUT
    ) -> ControlResult:
        """Put every connection of ``user`` on ``channel``, whatever their tokens allow."""
        return self._control("subscribe", user, timeout, channel=channel)

    def unsubscribe(
        self, user: str, channel: str, *, timeout: float = CONTROL_TIMEOUT
    ) -> ControlResult:
        """Take every connection of ``user`` off ``channel``."""
        return self._control("unsubscribe", user, timeout, channel=channel)

    def _control(self, op: str, user: str, timeout: float, **fields: Any) -> ControlResult:
        with self._controlling(op, user, timeout, **fields) as (span, key, request, acks):
            replicas = int(self._redis.execute_command(self._publish_command, key, request))
            tally = Tally()
            if acks is not None:
                deadline = time.monotonic() + timeout
                try:
                    while tally.acknowledged < replicas:
                        left = deadline - time.monotonic()
                        popped = self._redis.blpop([acks], timeout=left) if left > 0 else None
                        if popped is None:
                            break
                        tally.add(popped[1])
                finally:
                    self._redis.delete(acks)
            return self._controlled(span, tally.result(replicas))

    def presence(self, channel: str) -> list[dict[str, Any]]:
        """Every member of ``channel`` (a channel with presence): ``{"client", "user",
        "info"?}`` each, read page after page."""
        found: list[dict[str, Any]] = []
        cursor: Any = "0"
        while True:
            keys, args = self._presence_args(channel, cursor, 1000)
            cursor, entries = self._read_presence(keys, args)
            found.extend(self._members(entries))
            if cursor in (b"0", "0", 0):
                return found

    def presence_stats(self, channel: str) -> tuple[int, int]:
        """(clients, unique users) on ``channel``."""
        clients, users = self._presence_stats(*self._presence_args(channel))
        return int(clients), int(users)

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPublisher(_Base):
    """asyncio publisher; one instance can serve many concurrent tasks."""

    def __init__(self, redis_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(redis_url, **kwargs)
        self._redis: Any
        if self.sharded:
            seeds, options = parse_cluster_url(self.redis_url)
            self._redis = redis.asyncio.cluster.RedisCluster(
                startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in seeds],
                socket_connect_timeout=5,
                **options,
            )
        else:
            self._redis = redis.asyncio.Redis.from_url(self.redis_url, socket_connect_timeout=5)
        self._append_script = self._redis.register_script(APPEND_LUA)
        self._read_presence = self._redis.register_script(PRESENCE_READ_LUA)
        self._presence_stats = self._redis.register_script(STATS_LUA)

    async def publish(self, channel: str, data: Any, *, mid: str | None = None) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; return how many gateways got it."""
        with self._sending(channel, data, mid) as (span, key, envelope):
            await self._follow_kinds()  # after the checks: bad input never reaches Redis
            if self.history.applies(channel):
                keys, args = self._append(channel, key, envelope)
                return self._appended(span, await self._append_script(keys, args)).receivers
            receivers = int(await self._redis.execute_command(self._publish_command, key, envelope))
            span.set_attribute("wsgateway.receivers", receivers)
            return receivers

    async def append(
        self,
        channel: str,
        data: Any,
        *,
        mid: str | None = None,
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> Appended:
        """Publish ``data`` to history channel ``channel``; return its offset and epoch.

        With ``idempotency_key``, a retry within the idempotency window stores and sends
        nothing and returns the first message's offset (outcome ``DUPLICATE``). With
        ``version``, a message whose version is not above the channel's is dropped (outcome
        ``STALE``, with the channel's current offset). EnvelopeError when ``channel`` keeps
        no history or an argument is invalid.
        """
        self._check_append(idempotency_key, version)
        with self._sending(channel, data, mid) as (span, key, envelope):
            await self._follow_kinds()
            self._check_history(channel)
            keys, args = self._append(channel, key, envelope, idempotency_key, version)
            return self._appended(span, await self._append_script(keys, args))

    async def _follow_kinds(self) -> None:
        """Re-read the gateways' channel kinds when they are due (every few seconds)."""
        now = time.monotonic()
        if self.kinds.due(now):
            self.kinds.update(await self._redis.get(self._kinds_key), now)

    async def disconnect(
        self,
        user: str,
        *,
        code: int | None = None,
        reason: str | None = None,
        timeout: float = CONTROL_TIMEOUT,
    ) -> ControlResult:
        """Close every connection of ``user`` (their tokens' ``sub``) on every replica, with
        ``code`` (default 1008) and ``reason``; wait up to ``timeout`` seconds for the
        replicas to say how many they closed (0: do not wait)."""
        return await self._control("disconnect", user, timeout, code=code, reason=reason)

    async def subscribe(
        self, user: str, channel: str, *, timeout: float = CONTROL_TIMEOUT
    ) -> ControlResult:
        """Put every connection of ``user`` on ``channel``, whatever their tokens allow."""
        return await self._control("subscribe", user, timeout, channel=channel)

    async def unsubscribe(
        self, user: str, channel: str, *, timeout: float = CONTROL_TIMEOUT
    ) -> ControlResult:
        """Take every connection of ``user`` off ``channel``."""
        return await self._control("unsubscribe", user, timeout, channel=channel)

    async def _control(self, op: str, user: str, timeout: float, **fields: Any) -> ControlResult:
        with self._controlling(op, user, timeout, **fields) as (span, key, request, acks):
            replicas = int(await self._redis.execute_command(self._publish_command, key, request))
            tally = Tally()
            if acks is not None:
                deadline = time.monotonic() + timeout
                try:
                    while tally.acknowledged < replicas:
                        left = deadline - time.monotonic()
                        popped = await self._redis.blpop([acks], timeout=left) if left > 0 else None
                        if popped is None:
                            break
                        tally.add(popped[1])
                finally:
                    await self._redis.delete(acks)
            return self._controlled(span, tally.result(replicas))

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """Every member of ``channel`` (a channel with presence): ``{"client", "user",
        "info"?}`` each, read page after page."""
        found: list[dict[str, Any]] = []
        cursor: Any = "0"
        while True:
            keys, args = self._presence_args(channel, cursor, 1000)
            cursor, entries = await self._read_presence(keys, args)
            found.extend(self._members(entries))
            if cursor in (b"0", "0", 0):
                return found

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        """(clients, unique users) on ``channel``."""
        clients, users = await self._presence_stats(*self._presence_args(channel))
        return int(clients), int(users)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
