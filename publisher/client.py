"""Sync and asyncio publishers: validate, encode, ``PUBLISH`` on ``<prefix><channel>``."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio

from publisher.envelope import MAX_ENVELOPE_BYTES, build_envelope
from publisher.settings import PublisherSettings

__all__ = ["AsyncPublisher", "Publisher"]


class _Base:
    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        max_envelope_bytes: int = MAX_ENVELOPE_BYTES,
    ) -> None:
        defaults = PublisherSettings()
        self.redis_url = redis_url or defaults.redis_url
        self.prefix = defaults.channel_prefix if prefix is None else prefix
        self.max_envelope_bytes = max_envelope_bytes

    def encode(self, channel: str, data: Any, mid: str | None) -> tuple[bytes, bytes]:
        """(Redis channel, envelope); raises EnvelopeError before anything reaches Redis."""
        envelope = build_envelope(channel, data, mid=mid, max_bytes=self.max_envelope_bytes)
        return (self.prefix + channel).encode(), envelope


class Publisher(_Base):
    """Blocking publisher for scripts and sync services."""

    def __init__(self, redis_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(redis_url, **kwargs)
        self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)

    def publish(self, channel: str, data: Any, *, mid: str | None = None) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; return how many gateways got it."""
        key, envelope = self.encode(channel, data, mid)
        return int(self._redis.publish(key, envelope))

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
        self._redis = redis.asyncio.Redis.from_url(self.redis_url, socket_connect_timeout=5)

    async def publish(self, channel: str, data: Any, *, mid: str | None = None) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; return how many gateways got it."""
        key, envelope = self.encode(channel, data, mid)
        return int(await self._redis.publish(key, envelope))

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
