"""History channels' streams in Redis, through a client that runs scripts: a ``Redis`` for
the ``redis`` backplane, a ``RedisCluster`` for ``redis-cluster`` (the keys of one channel
share a slot, so each script runs on one node). Redis errors pass through unchanged; the
backplanes turn them into ``BackplaneUnavailable``.
"""

from __future__ import annotations

from typing import Any

from gateway.history import Page
from publisher.history import APPEND_LUA, READ_LUA, HistoryPolicy, history_keys

__all__ = ["Streams"]


class Streams:
    def __init__(
        self, client: Any, prefix: str, policy: HistoryPolicy, *, sharded: bool = False
    ) -> None:
        self.prefix = prefix
        self.policy = policy
        self.sharded = sharded  # publish with SPUBLISH
        self._append = client.register_script(APPEND_LUA)
        self._read = client.register_script(READ_LUA)

    async def append(self, channel: str, envelope: bytes) -> int:
        """Number, store and publish one message; return how many subscribers got it."""
        keys = history_keys(self.prefix, channel)
        args = self.policy.append_args(self.prefix + channel, envelope, sharded=self.sharded)
        _, _, receivers = await self._append(keys, args)
        return int(receivers)

    async def read(self, channel: str, after: int) -> Page:
        """Read in pages of ``policy.size`` until the top; each page is atomic, and a change
        of epoch between pages makes the result the new epoch's top with no entries."""
        keys = history_keys(self.prefix, channel)
        entries: list[tuple[int, bytes]] = []
        epoch: str | None = None
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
