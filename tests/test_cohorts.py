"""A busy channel's subscribers written in cohorts at staggered turns (gateway.cohorts): who is
written what, and when, driven as the hub drives it; no sockets, no clock."""

from __future__ import annotations

import itertools

import pytest

from gateway.cohorts import COHORTS, Cohorts, turns


class Member:
    def __init__(self, cohort: int) -> None:
        self.cohort = cohort


def cohort(member: Member) -> int:
    return member.cohort


def run(
    cohorts: Cohorts[int, int], messages: int, each: int, per_window: int
) -> tuple[dict[int, list[int]], list[list[int]]]:
    """Add ``messages`` numbered messages ``each`` at a time, taking one turn after each
    addition; return what every cohort received, in order, and who was written at each turn."""
    received: dict[int, list[int]] = {index: [] for index in range(COHORTS)}
    rounds: list[list[int]] = []
    numbers = itertools.count()
    for _ in range(messages // each):
        cohorts.add([next(numbers) for _ in range(each)])
        taken = cohorts.take(per_window)
        rounds.append([index for index, _ in taken])
        for index, items in taken:
            received[index].extend(items)
    return received, rounds


@pytest.mark.parametrize(
    ("worth", "expected"),
    [(0.0, 1), (0.5, 1), (1.0, 1), (1.8, 2), (2.74, 2), (2.75, 3), (3.9, 4), (40.0, COHORTS)],
)
def test_a_window_is_split_into_as_many_turns_as_it_gathers_messages_up_to_the_cohorts(
    worth: float, expected: int
) -> None:
    assert turns(worth) == expected


def test_one_turn_a_window_writes_every_cohort_each_time() -> None:
    received, rounds = run(Cohorts(), messages=10, each=1, per_window=1)
    assert all(sorted(taken) == list(range(COHORTS)) for taken in rounds)
    assert all(items == list(range(10)) for items in received.values())


def test_turns_go_round_and_every_cohort_gets_every_message_once_in_order() -> None:
    cohorts: Cohorts[int, int] = Cohorts()
    received, rounds = run(cohorts, messages=40, each=1, per_window=COHORTS)
    # One cohort a turn, each in turn: a window's worth (four messages) a write for each.
    assert [taken[0] for taken in rounds] == [index % COHORTS for index in range(40)]
    assert all(len(taken) == 1 for taken in rounds)
    # The first turn of each cohort is shorter: they start together and then stagger.
    assert [len(items) for items in (received[0], received[1])] == [37, 38]
    assert all(items == list(range(len(items))) for items in received.values())
    # The rest is waiting for its turn, and only that is kept.
    assert cohorts.pending and len(cohorts.log) == 3
    assert cohorts.take(1) and not cohorts.pending and cohorts.log == []


def test_two_turns_a_window_write_half_the_cohorts_each() -> None:
    received, rounds = run(Cohorts(), messages=12, each=1, per_window=2)
    assert [sorted(taken) for taken in rounds[:4]] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert received[0] == received[1] and received[2] == received[3]
    assert received[0][-2:] == [9, 10] and received[2][-2:] == [10, 11]


def test_three_turns_a_window_write_each_cohort_once_in_three() -> None:
    """Four cohorts over three turns: two on one of them, one on each other; every cohort
    is written every third message, never more often (which would cost more CPU)."""
    received, rounds = run(Cohorts(), messages=30, each=1, per_window=3)
    assert [sorted(taken) for taken in rounds[:6]] == [[0, 1], [2], [3], [0, 1], [2], [3]]
    assert [len(items) for items in received.values()] == [28, 28, 29, 30]
    assert all(items == list(range(len(items))) for items in received.values())


def test_when_the_turns_change_no_cohort_waits_more_than_a_window_of_them() -> None:
    cohorts: Cohorts[int, int] = Cohorts()
    last = dict.fromkeys(range(COHORTS), -1)
    for turn, per_window in enumerate([4] * 5 + [2] * 5 + [3] * 7 + [4] * 9 + [1] * 2):
        cohorts.add([turn])
        for index, _ in cohorts.take(per_window):
            assert turn - last[index] <= max(per_window, 4)
            last[index] = turn
    assert not cohorts.pending  # one turn a window: everybody


def test_a_cohort_with_nothing_new_is_passed_over() -> None:
    cohorts: Cohorts[int, int] = Cohorts()
    cohorts.add([1])
    assert [index for index, _ in cohorts.take_all()] == [0, 1, 2, 3]
    assert cohorts.take_all() == [] and cohorts.take(COHORTS) == []


def test_members_are_sorted_into_their_cohorts_until_they_change() -> None:
    cohorts: Cohorts[Member, int] = Cohorts()
    members = {Member(index): None for index in range(10)}
    groups = cohorts.members(members, cohort)
    assert [len(group) for group in groups] == [3, 3, 2, 2]
    assert all(m.cohort % COHORTS == index for index, group in enumerate(groups) for m in group)
    members[Member(7)] = None
    assert cohorts.members(members, cohort) is groups  # kept: nobody said they changed
    cohorts.regroup()
    assert [len(group) for group in cohorts.members(members, cohort)] == [3, 3, 2, 3]
