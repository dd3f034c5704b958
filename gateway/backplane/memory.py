"""In-process backplane: one replica, nothing to install, messages never leave the process.

History lives in the process too: it survives client reconnects, not a restart (a restarted
replica starts a new epoch, so clients learn that their position is gone).
"""

from __future__ import annotations

import collections
import time

from gateway.backplane.base import Backplane, Member, OnMessage, PresenceStore
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


class MemoryPresence(PresenceStore):
    """Presence of the one replica there is: nothing expires while it runs (it holds every
    member itself) and nothing outlives it, so there are no leases to keep."""

    def __init__(self, backplane: MemoryBackplane) -> None:
        self._backplane = backplane
        #: channel -> client -> (user, entry), in the order they joined.
        self._members: dict[str, dict[str, tuple[str | None, bytes]]] = {}

    async def join(self, channel: str, members: list[Member], ttl_ms: int) -> int:
        held = self._members.setdefault(channel, {})
        before = len(held)
        for client, user, entry in members:
            held[client] = (user, entry)
        return len(held) - before

    async def touch(self, channel: str, clients: list[str], ttl_ms: int) -> int:
        held = self._members.get(channel, {})
        return sum(1 for client in clients if client not in held)

    async def leave(self, channel: str, clients: list[str]) -> list[bytes]:
        held = self._members.get(channel, {})
        removed = []
        for client in clients:
            gone = held.pop(client, None)
            if gone is not None:
                removed.append(gone[1])
        if not held:
            self._members.pop(channel, None)
        return removed

    async def page(self, channel: str, cursor: str, count: int) -> tuple[str, list[bytes]]:
        entries = [entry for _, entry in self._members.get(channel, {}).values()]
        start = int(cursor) if cursor.isdigit() else 0
        end = start + count
        return (str(end) if end < len(entries) else "0"), entries[start:end]

    async def stats(self, channel: str) -> tuple[int, int]:
        held = self._members.get(channel, {})
        return len(held), len({user for user, _ in held.values() if user is not None})

    async def event(self, channel: str, payload: bytes) -> None:
        if channel in self._backplane.subscribed:
            self._backplane.deliver(channel, payload)

    async def renew_lease(
        self, replica: str, ttl_ms: int, added: list[str], removed: list[str]
    ) -> None:
        pass

    async def claim_dead(self) -> list[tuple[str, list[bytes]]]:
        return []

    async def end_lease(self, replica: str) -> None:
        pass


class MemoryBackplane(Backplane):
    name = "memory"

    def __init__(self, on_message: OnMessage, history: HistoryPolicy | None = None) -> None:
        super().__init__(on_message, history)
        self.subscribed: set[str] = set()
        self.presence = MemoryPresence(self)
        # Least recently published first, so silent channels past retention are forgotten.
        self._streams: collections.OrderedDict[str, _Stream] = collections.OrderedDict()

    @property
    def connected(self) -> bool:
        return True

    @property
    def subscribed_channels(self) -> int:
        return len(self.subscribed)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.subscribed.clear()

    async def subscribe(self, channel: str) -> None:
        self.subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.subscribed.discard(channel)

    def keep(self, channel: str) -> None:
        self.subscribed.add(channel)

    async def acknowledge(self, request_id: str, ack: bytes) -> None:
        # Only in-process code could publish a control request here, and nothing in the
        # process reads acknowledgements: keeping them would be a map nobody empties.
        pass

    async def advertise(self, document: bytes, ttl_ms: int) -> bytes | None:
        # Publishers outside the process cannot reach this backplane: nobody to tell.
        return None

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
        if channel not in self.subscribed:
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
        # As on Redis, whose script trims by age only as the next message arrives, the newest
        # message stays however old it is: a state channel's latest value.
        cutoff = now - self.history_policy.ttl
        entries: list[tuple[int, bytes]] = []
        budget = limit.bytes
        for offset, envelope, published in reversed(stream.entries):
            stale = published < cutoff and offset < stream.offset
            if offset <= after or stale or len(entries) == limit.messages:
                break
            budget -= len(envelope)
            if budget < 0:
                break
            entries.append((offset, envelope))
        entries.reverse()
        return Page(stream.epoch, stream.offset, entries)
