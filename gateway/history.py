"""History channels: positions, what a read of the history says, and in-order delivery. Pure.

A history channel's messages carry an ``offset`` (1, 2, 3, ... with no holes) within an
``epoch`` (the identity of the channel's stream; a new epoch means offsets restarted). A
channel never published to (or whose history was forgotten) is at offset 0 of
:data:`EMPTY_EPOCH`: the position before any epoch, which no read stores anywhere.

A :class:`Cursor` follows one channel on one replica: it lets each message through once, in
order, and says when one is missing so the hub can fetch it from the stream. :func:`recover`
decides what a client that asks to resume from a position gets; a read brings at most a
:class:`ReadLimit` of the newest messages, so a client further behind than that learns it
cannot be replayed rather than making the replica hold its whole gap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "EMPTY_EPOCH",
    "Cursor",
    "Page",
    "ReadLimit",
    "Recovery",
    "Verdict",
    "latest",
    "recover",
]

#: The epoch of a channel without history. Real epochs are 16 hex digits, never this.
EMPTY_EPOCH = "0"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReadLimit:
    """The most one read of a history brings: its newest ``messages`` and ``bytes``."""

    messages: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One read of a channel's history, taken atomically.

    ``epoch`` is None when the channel has no history (never published, or forgotten);
    ``top`` is the offset of its last message; ``entries`` are ``(offset, envelope)`` pairs in
    order: the newest ones after the offset that was asked for, still retained and within
    the read's limit (so they may start well after that offset).
    """

    epoch: str | None
    top: int
    entries: list[tuple[int, T]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Recovery(Generic[T]):
    """What a subscriber resuming from ``since`` gets.

    ``recovered`` says whether ``replay`` holds every message it missed; either way it
    continues live from ``position`` of ``epoch`` (everything up to it is replayed or lost).
    """

    recovered: bool
    epoch: str
    position: int
    replay: list[tuple[int, T]]


def recover(page: Page[T], since: tuple[int, str] | None) -> Recovery[T]:
    """Decide a resume from ``since`` (offset last seen, epoch) given a fresh ``page``.

    Without ``since`` nothing is replayed and the subscriber starts at the top. With it, the
    replay is complete only if the epoch is the same (offset 0 of :data:`EMPTY_EPOCH`, seen
    before the channel had history, is the start of any epoch) and the page holds every
    message after ``since`` up to the top.
    """
    epoch = page.epoch if page.epoch is not None else EMPTY_EPOCH
    if since is None:
        return Recovery(False, epoch, page.top, [])
    offset, since_epoch = since
    if since_epoch == EMPTY_EPOCH and offset == 0:
        since_epoch = epoch  # nothing was seen: the start of whatever history there is now
    entries = page.entries
    complete = (
        since_epoch == epoch
        and offset <= page.top
        and (entries[0][0] == offset + 1 if entries else offset == page.top)
        and (not entries or entries[-1][0] == page.top)
    )
    if not complete:
        return Recovery(False, epoch, page.top, [])
    return Recovery(True, epoch, page.top, entries)


def latest(page: Page[T], since: tuple[int, str] | None) -> Recovery[T]:
    """Decide a subscription that wants the channel's state, its newest message, given a
    fresh ``page`` that holds it (if it is still kept).

    ``replay`` is that message, unless ``since`` says the subscriber has it already; nothing
    older: state needs no log. ``recovered`` (meaningful with ``since``) says whether the
    subscriber ends with the current state in the same epoch as ``since``: a different epoch,
    or no message kept at all, means what it held belongs to a history that was lost.
    """
    epoch = page.epoch if page.epoch is not None else EMPTY_EPOCH
    newest = page.entries[-1:] if page.entries and page.entries[-1][0] == page.top else []
    if since == (page.top, epoch) or (since == (0, EMPTY_EPOCH) and page.top == 0):
        return Recovery(True, epoch, page.top, [])
    same = since is not None and since[1] in (epoch, EMPTY_EPOCH) and since[0] <= page.top
    return Recovery(bool(newest) and same, epoch, page.top, newest)


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
