"""A busy channel's subscribers written at staggered moments: its cohorts.

While the coalescing window holds a channel's messages (:mod:`gateway.coalescing`), each
subscriber gets a window's worth of them in one write. Written to everyone at once, a thousand
subscribers are a thousand writes back to back, 5 to 9 ms on a small VM: the loop reads no
message meanwhile, and the last subscriber waits for all the others. Instead a channel with
many subscribers splits them into :data:`COHORTS` cohorts (by a session's
:attr:`~gateway.session.Session.cohort`, the same on every channel), and its window into
:func:`turns`, as many as the window gathers messages, at most one per cohort: the channel is
written as it would be with a window that many times shorter, each time to the cohorts whose
turn it is (cohort ``i`` on turn ``i * turns // COHORTS``), what they have not had yet. Every
subscriber still gets a window's worth a write, so the CPU is the same; each fan-out is a
fraction as long.

Nothing here does I/O: the hub keeps one :class:`Cohorts` per channel it writes this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

__all__ = ["COHORTS", "MIN_MEMBERS", "Cohorts", "turns"]

#: Cohorts a busy channel's subscribers are split into.
COHORTS = 4
#: A channel with fewer subscribers is written to all of them at once: its fan-out is short.
MIN_MEMBERS = 64

M = TypeVar("M")  # a member (a session)
T = TypeVar("T")  # a message


def turns(worth: float, cohorts: int = COHORTS) -> int:
    """Turns a window is split into when it gathers ``worth`` messages: as many as it holds
    messages (within a quarter, as :func:`gateway.coalescing.gathered` counts), so that each
    turn has one to write, and at most one per cohort. One turn: everyone at once."""
    return max(1, min(cohorts, int(worth + 0.25)))


class Cohorts(Generic[M, T]):
    """One channel's messages that some cohort has not been written, where each cohort is in
    them, and whose turn is next."""

    __slots__ = ("_groups", "log", "starts", "turn", "turned")

    def __init__(self, count: int = COHORTS) -> None:
        #: The messages, oldest first, from the first that some cohort has not had.
        self.log: list[T] = []
        #: Per cohort, the index in :attr:`log` of the first message it has not had, and the
        #: turn it was last written on.
        self.starts = [0] * count
        self.turned = [0] * count
        #: Turns so far.
        self.turn = 0
        self._groups: list[list[M]] | None = None

    @property
    def pending(self) -> bool:
        """Whether some cohort has messages to be written."""
        return min(self.starts) < len(self.log)

    def add(self, messages: Sequence[T]) -> None:
        self.log.extend(messages)

    def regroup(self) -> None:
        """The channel's members changed: :meth:`members` sorts them again when next asked."""
        self._groups = None

    def members(self, everyone: Iterable[M], cohort: Callable[[M], int]) -> list[list[M]]:
        """``everyone`` sorted into the cohorts, in order (kept until :meth:`regroup`)."""
        groups = self._groups
        if groups is None:
            groups = self._groups = [[] for _ in self.starts]
            for member in everyone:
                groups[cohort(member) % len(groups)].append(member)
        return groups

    def take(self, turns: int) -> list[tuple[int, list[T]]]:
        """The next turn of ``turns`` a window (one: every cohort): the cohorts whose turn it
        is, or that have not been written for a whole window of turns (their number
        changed), each with the messages it has not had; they count as written from now on.
        A cohort with nothing to be written is passed over."""
        count, turn, end = len(self.starts), self.turn, len(self.log)
        self.turn += 1
        due = [
            index
            for index, (start, turned) in enumerate(zip(self.starts, self.turned, strict=True))
            if start < end and (index * turns // count == turn % turns or turn - turned >= turns)
        ]
        log, starts = self.log, self.starts
        taken = [(index, log[starts[index] :]) for index in due]
        for index in due:
            starts[index] = end
            self.turned[index] = turn
        oldest = min(starts)
        if oldest:  # what every cohort has had is dropped
            del log[:oldest]
            self.starts = [start - oldest for start in starts]
        return taken

    def take_all(self) -> list[tuple[int, list[T]]]:
        """Every cohort with messages waiting, each with them."""
        return self.take(1)
