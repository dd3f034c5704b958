"""Sync and asyncio publishers: validate, encode, ``PUBLISH`` on ``<prefix><channel>``.

Each publish is a PRODUCER span ``send <channel>`` (when an OpenTelemetry SDK is configured)
whose context travels in the envelope as ``traceparent``/``tracestate``, so the gateways'
CONSUMER spans link back to it.
"""

from __future__ import annotations

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
from publisher.envelope import MAX_ENVELOPE_BYTES, build_envelope, check_channel, new_mid
from publisher.history import APPEND_LUA, HistoryPolicy, history_keys
from publisher.settings import PublisherSettings

__all__ = ["AsyncPublisher", "Publisher"]


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
        #: Channels matching it are appended to their stream and numbered, atomically with
        #: the PUBLISH (publisher.history); default: the PUBLISHER_HISTORY_* settings.
        self.history = defaults.history() if history is None else history
        self.max_envelope_bytes = max_envelope_bytes
        self._tracer = trace.get_tracer("wsgateway.publisher", tracer_provider=tracer_provider)
        #: redis+cluster:// URLs publish with SPUBLISH to the node that serves the channel.
        self.sharded = is_cluster_url(self.redis_url)
        self._publish_command = "SPUBLISH" if self.sharded else "PUBLISH"

    @contextmanager
    def _sending(
        self, channel: str, data: Any, mid: str | None
    ) -> Iterator[tuple[Span, bytes, bytes]]:
        """Validate (raising EnvelopeError before anything reaches Redis), open the PRODUCER
        span, and yield it with the Redis channel and the envelope carrying its context."""
        check_channel(channel)
        mid = new_mid() if mid is None else mid
        with self._tracer.start_as_current_span(
            f"send {channel}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.destination.name": channel,
                "messaging.message.id": mid,
            },
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            envelope = build_envelope(
                channel,
                data,
                mid=mid,
                traceparent=carrier.get("traceparent"),
                tracestate=carrier.get("tracestate") or None,
                max_bytes=self.max_envelope_bytes,
            )
            yield span, (self.prefix + channel).encode(), envelope

    def _append(self, channel: str, key: bytes, envelope: bytes) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the history append script for one message."""
        return list(history_keys(self.prefix, channel)), self.history.append_args(
            key.decode(), envelope, sharded=self.sharded
        )

    @staticmethod
    def _appended(span: Span, result: list[Any]) -> int:
        offset, epoch, receivers = result
        span.set_attribute("wsgateway.history.offset", int(offset))
        span.set_attribute(
            "wsgateway.history.epoch", epoch.decode() if isinstance(epoch, bytes) else epoch
        )
        return int(receivers)


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

    def publish(self, channel: str, data: Any, *, mid: str | None = None) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; return how many gateways got it."""
        with self._sending(channel, data, mid) as (span, key, envelope):
            if self.history.applies(channel):
                keys, args = self._append(channel, key, envelope)
                return self._appended(span, self._append_script(keys, args))
            receivers = int(self._redis.execute_command(self._publish_command, key, envelope))
            span.set_attribute("wsgateway.receivers", receivers)
            return receivers

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

    async def publish(self, channel: str, data: Any, *, mid: str | None = None) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; return how many gateways got it."""
        with self._sending(channel, data, mid) as (span, key, envelope):
            if self.history.applies(channel):
                keys, args = self._append(channel, key, envelope)
                return self._appended(span, await self._append_script(keys, args))
            receivers = int(await self._redis.execute_command(self._publish_command, key, envelope))
            span.set_attribute("wsgateway.receivers", receivers)
            return receivers

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
