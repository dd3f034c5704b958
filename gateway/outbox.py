"""A client's bounded queue of outbound messages and the slow-consumer policy. Pure.

A session uses its outbox only while its transport is congested; an uncongested client gets
each frame written straight through. Both bounds (messages and bytes) always hold.
"""

from __future__ import annotations

from collections import deque

from gateway.protocol import Outbound
from gateway.settings import SlowConsumerPolicy

__all__ = ["Outbox"]


class Outbox:
    __slots__ = ("_items", "bytes", "dropped", "max_bytes", "max_messages", "policy")

    def __init__(self, max_messages: int, max_bytes: int, policy: SlowConsumerPolicy) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self._items: deque[Outbound] = deque()
        self.bytes = 0
        self.dropped = 0  # messages lost to drop-oldest / drop-newest

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def _fits(self, size: int) -> bool:
        return len(self._items) < self.max_messages and self.bytes + size <= self.max_bytes

    def push(self, item: Outbound) -> bool:
        """Queue ``item``; return False when the client must be closed (policy ``close``)."""
        size = len(item)
        if self._fits(size):
            self._append(item, size)
            return True
        if self.policy == "close":
            return False
        if self.policy == "drop-newest" or size > self.max_bytes:
            self.dropped += 1
            return True
        while self._items and not self._fits(size):
            self.bytes -= len(self._items.popleft())
            self.dropped += 1
        self._append(item, size)
        return True

    def _append(self, item: Outbound, size: int) -> None:
        self._items.append(item)
        self.bytes += size

    def pop_batch(self, max_bytes: int) -> list[Outbound]:
        """Take queued items in order, at least one and then up to ``max_bytes`` in all."""
        batch: list[Outbound] = []
        total = 0
        items = self._items
        while items and (not batch or total + len(items[0]) <= max_bytes):
            item = items.popleft()
            total += len(item)
            batch.append(item)
        self.bytes -= total
        return batch

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
