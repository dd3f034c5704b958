"""Delta compression of one channel: each message as its full text and as a Fossil delta
against the message before it, made once for every subscriber that takes deltas, and which
of the two each of them gets. Pure.

A subscriber that negotiated deltas gets every message after its ``subscribed`` reply's
offset as text: the first as its full text (its base), then deltas as long as it holds the
message before each (nothing dropped, no gap). The hub knows, and sends the full text again
whenever it cannot be sure; a queue that drops a message swaps the delta queued after it for
its full text (:mod:`gateway.outbox`).

The work is bounded: no delta is made for a text (or against one) over ``max_bytes``, nor
when more than half of the text is found to be new, so a large document that changed costs
a few milliseconds at most before its full text goes instead (docs/limits.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from gateway import fossil
from gateway.envelope import Envelope
from gateway.protocol import Outbound, Text, text_message

if TYPE_CHECKING:
    from gateway.session import Session

__all__ = ["DeltaChain", "Deltas", "Variant", "full_texts", "texts"]

#: A message of the chain as its full text and, when one could be made, as a delta.
Variant = tuple[Text, Text | None]


class DeltaChain:
    """The last numbered message of a channel, as the base of the next one's delta."""

    # __weakref__: a queue remembers broken chains without keeping them alive.
    __slots__ = ("__weakref__", "epoch", "max_bytes", "newest", "offset", "text")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.epoch: str | None = None
        self.offset = 0
        self.text: bytes | None = None
        self.newest: Text | None = None  # its full text frame

    def add(self, envelope: Envelope) -> Variant:
        """``envelope`` (numbered) as a full text frame, and as a delta frame when it
        follows the last one and a delta is worth making (None otherwise: a gap, a new
        epoch, the first one, a text over ``max_bytes``, one mostly new)."""
        text = bytes(envelope.data)
        full = text_message(envelope, text, delta=False, chain=self)
        delta = None
        base = self.text
        if (
            base is not None
            and envelope.epoch == self.epoch
            and envelope.offset == self.offset + 1
            and len(text) <= self.max_bytes
            and len(base) <= self.max_bytes
        ):
            made = fossil.create(base, text, max_insert=len(text) // 2)
            if made is not None:
                delta = text_message(envelope, made, delta=True, chain=self, full=full)
        self.epoch, self.offset, self.text = envelope.epoch, envelope.offset or 0, text
        self.newest = full
        return full, delta


def texts(
    batch: Sequence[Outbound], variants: Sequence[Variant | None], holding: bool
) -> list[Outbound]:
    """``batch`` as a delta subscriber gets it: each message of the chain as a delta while
    the subscriber holds the one before (``holding``: it holds the chain's last message
    before the batch), else as its full text; the others (events, unnumbered) as they are."""
    items: list[Outbound] = []
    for plain, variant in zip(batch, variants, strict=True):
        if variant is None:
            items.append(plain)
            holding = holding and plain.offset is None  # a numbered message outside the chain
        else:
            full, delta = variant
            items.append(delta if holding and delta is not None else full)
            holding = True
    return items


def full_texts(batch: Sequence[Outbound], variants: Sequence[Variant | None]) -> list[Outbound]:
    """``batch`` with each message of the chain as its full text."""
    return [
        plain if variant is None else variant[0]
        for plain, variant in zip(batch, variants, strict=True)
    ]


def _drops(session: Session) -> int:
    outbox = session.outbox
    return outbox.dropped if outbox is not None else 0


class Deltas:
    """The subscribers of one channel that take deltas, the chain of its messages' texts and
    the variants of the messages waiting for the channel's next write.

    ``wanted`` holds every session subscribed with deltas, from its request on (while it
    reads the history too); ``synced`` those that receive the live messages, each with its
    outbox's drop count when it was handed the chain's last message (it holds that message
    as long as the count has not changed), or -1: its next message of the chain is the full
    text. ``variants`` is aligned with the channel's batch by position: a message accepted
    before anyone wanted deltas has None, and the list is emptied at every write, so a
    subscriber leaving before the write can never leave texts behind for the next.
    """

    __slots__ = ("chain", "synced", "variants", "wanted")

    def __init__(self, max_bytes: int) -> None:
        self.wanted: dict[Session, None] = {}
        self.synced: dict[Session, int] = {}
        self.chain = DeltaChain(max_bytes)
        self.variants: list[Variant | None] = []

    def accept(self, envelope: Envelope, position: int) -> None:
        """The batch's message at ``position`` (accepted from ``envelope``): its full text
        and delta, made once for every delta subscriber."""
        variants = self.variants
        if len(variants) < position:
            variants.extend([None] * (position - len(variants)))
        if envelope.offset is None or envelope.epoch is None or envelope.event is not None:
            variants.append(None)  # not part of the chain: as everybody gets it
        else:
            variants.append(self.chain.add(envelope))

    def take(self, size: int) -> list[Variant | None]:
        """The variants of the batch being written (``size`` messages), and a fresh start."""
        variants, self.variants = self.variants, []
        if len(variants) < size:
            variants.extend([None] * (size - len(variants)))
        return variants

    def groups(
        self, batch: Sequence[Outbound], variants: Sequence[Variant | None], frame: bytes
    ) -> Iterator[tuple[Iterable[Session], Sequence[Outbound], bytes]]:
        """The synced subscribers in (at most) two groups, each with the messages it gets
        and those joined into one buffer (``frame`` is ``batch`` joined): those that hold
        the chain's last message get deltas, the others its full text first."""
        if all(variant is None for variant in variants):
            yield self.synced, batch, frame  # nothing of the chain: the plain batch
            return
        holding: dict[Session, None] = {}
        behind: dict[Session, None] = {}
        synced = self.synced
        for session, seen in synced.items():
            drops = _drops(session)
            (holding if seen == drops else behind)[session] = None
            # Its count before this batch: if its queue drops anything from now on, the
            # count differs next time and it gets the full text.
            synced[session] = drops
        for group, holds in ((holding, True), (behind, False)):
            if group:
                items = texts(batch, variants, holds)
                yield group, items, b"".join([item.frame for item in items])

    def admit(self, session: Session, items: Sequence[Outbound], drops: int) -> None:
        """``session`` receives the live messages from now on, having just been handed
        ``items`` (what a subscriber catching up got last) when its drop count was
        ``drops``: in sync if the last message of them is the chain's newest."""
        last = next((item for item in reversed(items) if item.offset is not None), None)
        newest = self.chain.newest
        chained = isinstance(last, Text) and newest is not None and (last.full or last) is newest
        self.synced[session] = drops if chained else -1

    def leave(self, session: Session) -> None:
        self.wanted.pop(session, None)
        self.synced.pop(session, None)
