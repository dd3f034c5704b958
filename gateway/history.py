"""History channels: positions, what a read of the history says, and in-order delivery. Pure.

A history channel's messages carry an ``offset`` (1, 2, 3, ... with no holes) within an
``epoch`` (the identity of the channel's stream; a new epoch means offsets restarted). A
:class:`Cursor` follows one channel on one replica: it lets each message through once, in
order, and says when one is missing so the hub can fetch it from the stream. :func:`recover`
decides what a client that asks to resume from a position gets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Cursor", "Page", "Recovery", "Verdict", "recover"]


@dataclass(frozen=True, slots=True)
class Page:
    """One read of a channel's history, taken atomically.

    ``epoch`` is None when the channel has no history (never published, or forgotten);
    ``top`` is the offset of its last message; ``entries`` are ``(offset, envelope)`` pairs in
    order, those after the offset that was asked for and still retained.
    """

    epoch: str | None
    top: int
    entries: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a subscriber resuming from ``since`` gets.

    ``recovered`` says whether ``replay`` holds every message it missed; either way it
    continues live from ``position`` (its offset: everything up to it is replayed or lost).
    """

    recovered: bool
    epoch: str | None
    position: int
    replay: list[tuple[int, bytes]]


def recover(page: Page, since: tuple[int, str] | None) -> Recovery:
    """Decide a resume from ``since`` (offset last seen, epoch) given a fresh ``page``.

    Without ``since`` nothing is replayed and the subscriber starts at the top. With it, the
    replay is complete only if the epoch is the same and the stream still holds the message
    right after ``since`` (or nothing was published since).
    """
    if since is None:
        return Recovery(False, page.epoch, page.top, [])
    offset, epoch = since
    entries = page.entries
    complete = (
        page.epoch is not None
        and epoch == page.epoch
        and offset <= page.top
        and (entries[0][0] == offset + 1 if entries else offset == page.top)
        and (not entries or entries[-1][0] == page.top)
    )
    if not complete:
        return Recovery(False, page.epoch, page.top, [])
    return Recovery(True, page.epoch, page.top, entries)


class Verdict(enum.Enum):
    DELIVER = "deliver"  # the next message (or the first one seen)
    DUPLICATE = "duplicate"  # already delivered
    GAP = "gap"  # messages between the last delivered and this one are missing


class Cursor:
    """The last message of one history channel delivered to its subscribers."""

    __slots__ = ("epoch", "offset")

    def __init__(self, epoch: str | None = None, offset: int | None = None) -> None:
        self.epoch = epoch
        self.offset = offset

    def check(self, epoch: str, offset: int) -> Verdict:
        """What to do with message ``offset`` of ``epoch``; does not move the cursor."""
        if self.offset is None or epoch != self.epoch:
            # Nothing delivered yet in this epoch: the stream restarted, or this is the first.
            if self.epoch is not None and epoch != self.epoch and offset > 1:
                return Verdict.GAP
            return Verdict.DELIVER
        if offset <= self.offset:
            return Verdict.DUPLICATE
        return Verdict.DELIVER if offset == self.offset + 1 else Verdict.GAP

    def advance(self, epoch: str, offset: int) -> None:
        self.epoch = epoch
        self.offset = offset

    def after(self, epoch: str | None) -> int:
        """The offset to read the stream after, to fill what this cursor has not seen."""
        return self.offset if self.offset is not None and epoch == self.epoch else 0
