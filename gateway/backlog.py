"""Messages received from the backplane and not yet fanned out, per channel. Pure.

The backplane's reader only appends here, which is cheap, so it keeps up with Redis even
when fanning out cannot (Redis disconnects a subscriber that falls 32 MB behind, and every
channel of the replica then loses what was published meanwhile). The hub takes the messages
back one channel after the other, round robin, so a channel flooded with messages waits
behind its own flood and never in front of a quiet one.

Both bounds hold whatever arrives: at most ``max_per_channel`` messages wait for one channel,
at most ``max_bytes`` for all. Beyond either, the oldest message of the busiest channel is
dropped: a replica that cannot keep up sheds the load of whoever causes it.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Backlog"]


class _Queue:
    __slots__ = ("bytes", "messages")

    def __init__(self) -> None:
        self.messages: deque[bytes] = deque()
        self.bytes = 0


class Backlog:
    __slots__ = ("_queues", "_ready", "bytes", "dropped", "max_bytes", "max_per_channel")

    def __init__(self, max_per_channel: int, max_bytes: int) -> None:
        self.max_per_channel = max_per_channel
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0  # messages shed, in all
        self._queues: dict[str, _Queue] = {}
        self._ready: deque[str] = deque()  # channels with messages, in turn order

    def __bool__(self) -> bool:
        return bool(self._ready)

    def __len__(self) -> int:
        return sum(len(queue.messages) for queue in self._queues.values())

    def push(self, channel: str, payload: bytes) -> None:
        queue = self._queues.get(channel)
        if queue is None:
            queue = self._queues[channel] = _Queue()
            self._ready.append(channel)
        queue.messages.append(payload)
        queue.bytes += len(payload)
        self.bytes += len(payload)
        if len(queue.messages) > self.max_per_channel:
            self._drop_oldest(channel, queue)
        while self.bytes > self.max_bytes:
            found = self._queues.get(channel)
            if found is None or found.bytes * len(self._queues) < self.bytes:
                # This channel holds less than its share: drop from the one holding most.
                channel = max(self._queues, key=lambda name: self._queues[name].bytes)
                found = self._queues[channel]
            self._drop_oldest(channel, found)

    def _drop_oldest(self, channel: str, queue: _Queue) -> None:
        payload = queue.messages.popleft()
        queue.bytes -= len(payload)
        self.bytes -= len(payload)
        self.dropped += 1
        if not queue.messages:
            del self._queues[channel]
            self._ready.remove(channel)

    def take(self, channel: str) -> list[bytes]:
        """Every message waiting for ``channel``, out of turn."""
        queue = self._queues.pop(channel, None)
        if queue is None:
            return []
        self._ready.remove(channel)
        self.bytes -= queue.bytes
        return list(queue.messages)

    def pop(self) -> tuple[str, bytes]:
        """The next message of the next channel in turn (raises IndexError when empty)."""
        channel = self._ready.popleft()
        queue = self._queues[channel]
        payload = queue.messages.popleft()
        queue.bytes -= len(payload)
        self.bytes -= len(payload)
        if queue.messages:
            self._ready.append(channel)
        else:
            del self._queues[channel]
        return channel, payload
