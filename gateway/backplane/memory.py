"""In-process backplane: one replica, nothing to install, messages never leave the process.

History lives in the process too: it survives client reconnects, not a restart (a restarted
replica starts a new epoch, so clients learn that their position is gone).
"""

from __future__ import annotations

import collections
import time

from gateway.backplane.base import Backplane, OnMessage
from gateway.history import Page, ReadLimit
from publisher.history import HistoryPolicy, new_epoch, numbered

__all__ = ["MemoryBackplane"]


class _Stream:
    __slots__ = ("entries", "epoch", "offset", "used")

    def __init__(self, size: int) -> None:
        self.used = 0.0  # monotonic time of the last publish
        self.epoch = new_epoch()  # a forgotten and recreated stream must not reuse offsets
        self.offset = 0
        self.entries: collections.deque[tuple[int, bytes, float]] = collections.deque(maxlen=size)


class MemoryBackplane(Backplane):
    name = "memory"

    def __init__(self, on_message: OnMessage, history: HistoryPolicy | None = None) -> None:
        super().__init__(on_message, history)
        self._channels: set[str] = set()
        # Least recently published first, so silent channels past retention are forgotten.
        self._streams: collections.OrderedDict[str, _Stream] = collections.OrderedDict()

    @property
    def connected(self) -> bool:
        return True

    @property
    def subscribed_channels(self) -> int:
        return len(self._channels)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._channels.clear()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, envelope: bytes) -> int:
        policy = self.history_policy
        if policy.applies(channel):
            now = time.monotonic()
            stream = self._stream(channel, now)
            stream.offset += 1
            envelope = numbered(envelope, stream.offset, stream.epoch)
            stream.entries.append((stream.offset, envelope, now))
            while stream.entries and stream.entries[0][2] < now - policy.ttl:
                stream.entries.popleft()
        if channel not in self._channels:
            return 0
        self.deliver(channel, envelope)
        return 1

    def _forget_silent(self, now: float) -> None:
        """Drop the streams silent for longer than the retention."""
        streams = self._streams
        retention = max(self.history_policy.retention, self.history_policy.ttl)
        while streams:
            oldest = next(iter(streams.values()))
            if oldest.used >= now - retention:
                break
            streams.popitem(last=False)

    def _stream(self, channel: str, now: float) -> _Stream:
        """The channel's stream, made if needed."""
        self._forget_silent(now)
        streams = self._streams
        stream = streams.get(channel)
        if stream is None:
            stream = streams[channel] = _Stream(self.history_policy.size)
        streams.move_to_end(channel)
        stream.used = now
        return stream

    async def history(self, channel: str, after: int, limit: ReadLimit) -> Page[bytes]:
        now = time.monotonic()
        self._forget_silent(now)
        stream = self._streams.get(channel)
        if stream is None:
            return Page(None, 0)  # nothing made for a channel never published to
        cutoff = now - self.history_policy.ttl
        entries: list[tuple[int, bytes]] = []
        budget = limit.bytes
        for offset, envelope, published in reversed(stream.entries):
            if offset <= after or published < cutoff or len(entries) == limit.messages:
                break
            budget -= len(envelope)
            if budget < 0:
                break
            entries.append((offset, envelope))
        entries.reverse()
        return Page(stream.epoch, stream.offset, entries)
