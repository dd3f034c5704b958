"""A client's bounded queue of outbound messages and the slow-consumer policy. Pure.

A session uses its outbox only while its transport is congested or a replay is under way;
an uncongested client gets each frame written straight through. Both bounds (messages and
bytes) always hold for what the outbox owns.

A replay (the messages a resuming client missed) waits in the outbox as one entry, a
:class:`Replay`: a view of a list of messages that every client resuming together shares,
taken page by page as the client's transport drains. Its messages belong to that shared
list, so they do not count against the client's byte bound; the entry counts as one
message, and what arrives after it waits behind it, within the bounds.

A delta (:class:`~gateway.protocol.Text` with a ``full`` text) is useless to a client that
did not get the message before it in its chain. So when the outbox drops a message of a
chain, the next message of that chain it holds, if a delta, goes out as its full text when
its turn comes (swapped then, not at once: a swap that grew the queue would make it drop
more); if it holds none, the next one pushed is taken as its full text. (Once the outbox is
empty, the hub's own check takes over: it sends the full text to a client whose queue
dropped anything since.)
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Sequence

from gateway.protocol import Outbound, Text
from gateway.settings import SlowConsumerPolicy

__all__ = ["Outbox", "Replay"]


class Replay:
    """The part of a shared list of messages one client has still to receive."""

    __slots__ = ("index", "items")

    def __init__(self, items: Sequence[Outbound]) -> None:
        self.items = items
        self.index = 0

    def __len__(self) -> int:
        return len(self.items) - self.index

    def take(self, max_bytes: int) -> list[Outbound]:
        """The next messages, at least one and then up to ``max_bytes`` in all."""
        items, start = self.items, self.index
        end, total = start, 0
        while end < len(items) and (end == start or total + len(items[end]) <= max_bytes):
            total += len(items[end])
            end += 1
        self.index = end
        return list(items[start:end])


class Outbox:
    __slots__ = (
        "_broken",
        "_items",
        "_unbased",
        "bytes",
        "dropped",
        "max_bytes",
        "max_messages",
        "policy",
    )

    def __init__(self, max_messages: int, max_bytes: int, policy: SlowConsumerPolicy) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self._items: deque[Outbound | Replay] = deque()
        self.bytes = 0
        self.dropped = 0  # messages lost to drop-oldest / drop-newest
        #: Chains whose last message given to the outbox was dropped (None while there is
        #: none): their next delta goes as its full text. Weak: a chain whose channel is
        #: gone is not kept alive by a queue that never empties.
        self._broken: weakref.WeakSet[object] | None = None
        #: Queued deltas whose base was dropped: each goes as its full text when popped.
        self._unbased: set[Outbound] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def replaying(self) -> bool:
        """The next messages to write come from a replay."""
        return bool(self._items) and isinstance(self._items[0], Replay)

    def _fits(self, size: int) -> bool:
        return len(self._items) < self.max_messages and self.bytes + size <= self.max_bytes

    def push(self, item: Outbound) -> bool:
        """Queue ``item``; return False when the client must be closed (policy ``close``)."""
        item = self._based(item)
        size = len(item)
        if self._fits(size):
            self._append(item, size)
            return True
        if self.policy == "close":
            return False
        if self.policy == "drop-newest" or size > self.max_bytes:
            self._lose(item)
            return True
        while self._items and not self._fits(size):
            self._drop_oldest()
            # What was dropped may have been the message before it (nothing of its chain
            # queued after that one): it arrives as its full text, counted as such.
            item = self._based(item)
            size = len(item)
        if size > self.max_bytes:  # a delta become its full text, too large after all
            self._lose(item)
            return True
        self._append(item, size)
        return True

    def push_replay(self, items: Sequence[Outbound]) -> None:
        """Queue a replay of shared ``items`` behind what is queued, whatever the bounds: it
        is what the client asked for, bounded by the replay limits."""
        if items:
            self._items.append(Replay(items))

    def _append(self, item: Outbound, size: int) -> None:
        self._items.append(item)
        self.bytes += size
        if self._broken and isinstance(item, Text):
            self._broken.discard(item.chain)

    def _based(self, item: Outbound) -> Outbound:
        """``item``, or its full text if it is a delta whose base was dropped."""
        broken = self._broken
        if broken and isinstance(item, Text) and item.full is not None and item.chain in broken:
            return item.full
        return item

    def _lose(self, item: Outbound) -> None:
        """``item`` arrived and was not queued: the next of its chain cannot be a delta."""
        self.dropped += 1
        if isinstance(item, Text):
            self._break(item.chain)

    def _break(self, chain: object) -> None:
        if self._broken is None:
            self._broken = weakref.WeakSet()
        self._broken.add(chain)

    def _drop_oldest(self) -> None:
        oldest = self._items.popleft()
        if isinstance(oldest, Replay):
            self.dropped += len(oldest)
            return
        self.bytes -= len(oldest)
        self.dropped += 1
        if self._unbased:
            self._unbased.discard(oldest)
        if not isinstance(oldest, Text):
            return
        # The next message of its chain, if queued and a delta, goes as its full text.
        for queued in self._items:
            if isinstance(queued, Text) and queued.chain is oldest.chain:
                if queued.full is not None:
                    if self._unbased is None:
                        self._unbased = set()
                    self._unbased.add(queued)
                return
        self._break(oldest.chain)

    def pop_batch(self, max_bytes: int) -> list[Outbound]:
        """Take queued messages in order, at least one and then up to ``max_bytes`` in all.

        A replay at the head gives a page of its messages; queued messages behind it wait
        for the next batch, so a batch never mixes the two.
        """
        items = self._items
        head = items[0]
        if isinstance(head, Replay):
            page = head.take(max_bytes)
            if not head:
                items.popleft()
            return page
        batch: list[Outbound] = []
        total = 0
        unbased = self._unbased
        while items and not isinstance(head := items[0], Replay):
            if batch and total + len(head) > max_bytes:
                break
            items.popleft()
            total += len(head)
            if unbased and head in unbased:
                unbased.discard(head)
                assert isinstance(head, Text) and head.full is not None
                head = head.full
            batch.append(head)
        self.bytes -= total
        if not items:
            self._broken = None  # the hub's check takes over
        return batch

    def clear(self) -> int:
        """Forget everything queued; return how many messages that was."""
        count = sum(len(item) if isinstance(item, Replay) else 1 for item in self._items)
        self._items.clear()
        self.bytes = 0
        self._broken = self._unbased = None
        return count
