"""The backplane carries published envelopes to every replica that has subscribers.

One interface, two implementations side by side: :mod:`~gateway.backplane.memory` (in-process,
one replica, the default when no Redis URL is set) and :mod:`~gateway.backplane.redis`.
"""

from __future__ import annotations

from gateway.backplane.base import Backplane, BackplaneUnavailable, OnMessage, RedisOptions
from gateway.settings import Settings

__all__ = ["Backplane", "BackplaneUnavailable", "OnMessage", "create_backplane"]


def create_backplane(settings: Settings, on_message: OnMessage) -> Backplane:
    if settings.redis_url is None:
        from gateway.backplane.memory import MemoryBackplane

        return MemoryBackplane(on_message, settings.history())
    url = settings.redis_url.get_secret_value()
    options = RedisOptions(
        prefix=settings.channel_prefix,
        subscribe_timeout=settings.subscribe_timeout,
        reconnect_min=settings.reconnect_min,
        reconnect_max=settings.reconnect_max,
        probe_interval=settings.probe_interval,
        probe_timeout=settings.probe_timeout,
        max_connections=settings.redis_max_connections,
    )
    if url.startswith("redis+cluster://"):
        from gateway.backplane.cluster import RedisClusterBackplane

        return RedisClusterBackplane(url, on_message, options, settings.history())
    from gateway.backplane.redis import RedisBackplane

    return RedisBackplane(url, on_message, options, settings.history())
