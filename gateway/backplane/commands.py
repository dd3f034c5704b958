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
from gateway.history import Page
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

    async def read(self, channel: str, after: int) -> Page:
        """Read in pages of ``policy.size`` until the top; each page is atomic, and a change
        of epoch between pages makes the result the new epoch's top with no entries."""
        keys = history_keys(self.names.prefix, channel)
        entries: list[tuple[int, bytes]] = []
        epoch: str | None = None
        try:
            while True:
                raw_epoch, top, raw_entries = await self._read(
                    keys, self.policy.read_args(after, self.policy.size)
                )
                page_epoch = raw_epoch.decode()
                if epoch is not None and page_epoch != epoch:
                    return Page(page_epoch, int(top))
                epoch = page_epoch
                for entry_id, fields in raw_entries:
                    entries.append((int(entry_id.split(b"-", 1)[1]), fields[1]))
                if not raw_entries or entries[-1][0] >= int(top):
                    return Page(epoch, int(top), entries)
                after = entries[-1][0]
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None
