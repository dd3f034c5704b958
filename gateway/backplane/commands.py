"""What the Redis backplanes send as commands: publishes (plain, or numbered into a history
channel's stream) and history reads.

One object serves both backplanes, through a client that runs commands and scripts: a
``Redis`` for ``redis``, a ``RedisCluster`` for ``redis-cluster`` (where it publishes with
``SPUBLISH``; the keys of one channel share a slot, so each script runs on one node). Redis
errors become :class:`BackplaneUnavailable`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import RedisError

from gateway.backplane.base import BackplaneUnavailable, ChannelNames
from gateway.history import Page, ReadLimit
from publisher.history import APPEND_LUA, READ_LUA, HistoryPolicy, history_keys

__all__ = ["LOST", "RedisCommands"]

#: What a lost or failing Redis raises.
LOST = (RedisError, OSError, asyncio.TimeoutError)


class RedisCommands:
    def __init__(
        self, client: Any, names: ChannelNames, policy: HistoryPolicy, *, sharded: bool = False
    ) -> None:
        self.client = client
        self.names = names
        self.policy = policy
        self.sharded = sharded
        self._publish = "SPUBLISH" if sharded else "PUBLISH"
        self._append = client.register_script(APPEND_LUA)
        self._read = client.register_script(READ_LUA)

    async def publish(self, channel: str, envelope: bytes) -> int:
        """Publish (a history channel's message numbered and stored in the same step);
        return how many subscribed connections got it."""
        try:
            if self.policy.applies(channel):
                keys = history_keys(self.names.prefix, channel)
                key = self.names.prefix + channel
                args = self.policy.append_args(key, envelope, sharded=self.sharded)
                _, _, receivers = await self._append(keys, args)
                return int(receivers)
            key_bytes = self.names.key(channel)
            return int(await self.client.execute_command(self._publish, key_bytes, envelope))
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None

    async def read(self, channel: str, after: int, limit: ReadLimit) -> Page[bytes]:
        """The newest entries after ``after`` within ``limit``, in one atomic read."""
        keys = history_keys(self.names.prefix, channel)
        try:
            raw_epoch, top, raw_entries = await self._read(
                keys, self.policy.read_args(after, limit.messages, limit.bytes)
            )
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None
        if raw_epoch is None:
            return Page(None, 0)
        entries = [(int(entry_id.split(b"-", 1)[1]), fields[1]) for entry_id, fields in raw_entries]
        return Page(raw_epoch.decode(), int(top), entries)
