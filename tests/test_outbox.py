"""The per-client queue bounds and slow-consumer policies, without sockets."""

from __future__ import annotations

from gateway.outbox import Outbox
from gateway.protocol import Outbound, Text


def item(n: int, size: int = 10) -> Outbound:
    return Outbound(str(n).encode().ljust(size, b" "))


def texts(outbox: Outbox) -> list[bytes]:
    return [i.text.strip() for i in outbox.pop_batch(10**9)]


def test_close_policy_refuses_past_the_message_bound() -> None:
    outbox = Outbox(3, 10**6, "close")
    assert all(outbox.push(item(n)) for n in range(3))
    assert not outbox.push(item(3))
    assert len(outbox) == 3 and outbox.dropped == 0


def test_close_policy_refuses_past_the_byte_bound() -> None:
    size = len(item(0))
    outbox = Outbox(100, 2 * size, "close")
    assert outbox.push(item(0)) and outbox.push(item(1))
    assert not outbox.push(item(2))
    assert outbox.bytes == 2 * size


def test_drop_oldest_keeps_the_newest() -> None:
    outbox = Outbox(3, 10**6, "drop-oldest")
    for n in range(10):
        assert outbox.push(item(n))
    assert outbox.dropped == 7
    assert texts(outbox) == [b"7", b"8", b"9"]
    assert outbox.bytes == 0


def test_drop_newest_keeps_the_oldest() -> None:
    outbox = Outbox(3, 10**6, "drop-newest")
    for n in range(10):
        assert outbox.push(item(n))
    assert outbox.dropped == 7
    assert texts(outbox) == [b"0", b"1", b"2"]


def test_drop_oldest_by_bytes_evicts_as_many_as_needed() -> None:
    small = len(item(0, 10))
    outbox = Outbox(100, 4 * small, "drop-oldest")
    for n in range(4):
        outbox.push(item(n, 10))
    big = item(9, 2 * small - 4)  # needs the room of two small ones
    assert outbox.push(big)
    assert outbox.dropped == 2
    assert outbox.bytes <= outbox.max_bytes
    assert texts(outbox) == [b"2", b"3", b"9"]


def test_an_item_larger_than_the_byte_bound_is_dropped_not_queued() -> None:
    outbox = Outbox(10, 1024, "drop-oldest")
    outbox.push(item(1))
    assert outbox.push(item(2, 5000))
    assert outbox.dropped == 1
    assert texts(outbox) == [b"1"]


def test_pop_batch_coalesces_up_to_a_byte_budget_but_always_one() -> None:
    outbox = Outbox(100, 10**6, "close")
    for n in range(10):
        outbox.push(item(n, 100))
    frame = len(item(0, 100))
    assert len(outbox.pop_batch(3 * frame)) == 3
    assert len(outbox.pop_batch(1)) == 1  # never stuck on a frame larger than the budget
    assert len(outbox) == 6
    assert outbox.bytes == 6 * frame


def test_a_replay_is_taken_page_by_page_in_its_place_in_the_queue() -> None:
    outbox = Outbox(10, 100, "close")
    shared = [item(n) for n in range(10, 20)]  # ten messages of 12 bytes (frame)
    assert outbox.push(item(1))
    outbox.push_replay(shared)
    assert outbox.push(item(2))
    # The replay's messages are shared: only the two queued ones count against the bytes.
    assert outbox.bytes == 2 * len(item(0)) and len(outbox) == 3
    assert [i.text.strip() for i in outbox.pop_batch(10**9)] == [b"1"]  # never mixed
    assert outbox.replaying
    pages = []
    while outbox.replaying:
        pages.append([i.text.strip() for i in outbox.pop_batch(3 * len(item(0)))])
    assert pages == [[b"10", b"11", b"12"], [b"13", b"14", b"15"], [b"16", b"17", b"18"], [b"19"]]
    assert texts(outbox) == [b"2"]
    assert shared[0].text.strip() == b"10"  # taken, not consumed: others share the list


def test_a_replay_counts_as_one_message_and_goes_whole_when_dropped() -> None:
    outbox = Outbox(2, 10**6, "drop-oldest")
    outbox.push_replay([item(n) for n in range(5)])
    assert outbox.push(item(7))
    assert outbox.push(item(8))  # the replay is the oldest entry: its five are dropped
    assert outbox.dropped == 5
    assert texts(outbox) == [b"7", b"8"]
    outbox.push_replay([item(n) for n in range(3)])
    assert outbox.clear() == 3


# Deltas: a queue that drops a message of a chain never leaves a delta without its base


class Chain:
    """Stands for a channel's DeltaChain: something a queue can hold a weak reference to."""


def chain_of(chain: object, offsets: range, size: int = 40) -> list[tuple[Text, Text]]:
    """For each offset: its full text (``size`` bytes) and its delta (a few bytes)."""
    pairs = []
    for offset in offsets:
        full = Text(b"F%d" % offset + b" " * size, None, offset, chain)
        pairs.append((full, Text(b"D%d" % offset, None, offset, chain, full)))
    return pairs


def test_drop_oldest_sends_the_delta_after_a_dropped_message_as_its_full_text() -> None:
    outbox = Outbox(3, 10**6, "drop-oldest")
    a, b = Chain(), Chain()
    (a1, _), (_, a2), (_, a3) = chain_of(a, range(1, 4))
    (b1, _), (_, b2) = chain_of(b, range(1, 3))
    for pushed in (a1, b1, a2):
        outbox.push(pushed)
    outbox.push(b2)  # drops a1: a2 is now useless as a delta, its full text goes
    outbox.push(a3)  # drops b1: b2 goes full too; a3 applies to a2, which is queued
    assert [i.text.split()[0] for i in outbox.pop_batch(10**9)] == [b"F2", b"F2", b"D3"]
    assert outbox.dropped == 2


def test_a_dropped_message_with_nothing_of_its_chain_queued_makes_the_next_one_full() -> None:
    a = Chain()
    pairs = chain_of(a, range(1, 6))
    # drop-newest: message 2 does not fit, 3 (a small delta) would, but its base is gone.
    outbox = Outbox(10, len(pairs[0][0]) + 10, "drop-newest")
    outbox.push(pairs[0][0])
    big = Text(b"F2" + b" " * 100, None, 2, a)
    outbox.push(Text(b"D2" + b" " * 100, None, 2, a, big))
    outbox.push(pairs[2][1])
    outbox.push(pairs[3][1])
    assert [i.text.split()[0] for i in outbox.pop_batch(10**9)] == [b"F1"]
    assert outbox.dropped == 3  # 2; 3 as its full text does not fit either; 4 after it
    # drop-oldest: the dropped message was the last of its chain in the queue.
    outbox = Outbox(2, 10**6, "drop-oldest")
    outbox.push(pairs[0][0])
    outbox.push(item(7))
    outbox.push(item(8))  # drops message 1 of the chain
    outbox.push(pairs[1][1])  # its delta would apply to message 1: its full text instead
    assert [i.text.split()[0] for i in outbox.pop_batch(10**9)] == [b"8", b"F2"]


def test_drop_oldest_drops_only_what_makes_room_when_deltas_lose_their_base() -> None:
    """A delta behind a dropped message goes as its full text when its turn comes, not at
    once: swapping it in the queue grew the queue, which dropped more, which swapped more
    (39 of 40 messages lost where 19 made room)."""
    a = Chain()
    outbox = Outbox(100, 2048, "drop-oldest")
    fulls = []
    for n in range(20):
        full = Text(b"F%02d" % n + b" " * 1497, None, n, a)
        fulls.append(full)
        outbox.push(Text(b"D%02d" % n + b" " * 37, None, n, a, full))  # 40 bytes
        outbox.push(item(100 + n, 40))
    assert outbox.dropped == 0
    outbox.push(item(999, 1100))
    assert outbox.dropped <= 20, outbox.dropped  # what 1,100 bytes need, no more
    sent = [i.text.split()[0] for i in outbox.pop_batch(10**9)]
    first = sent[0]
    assert first.startswith(b"F") or first.startswith(b"1"), sent[:3]  # a base, then deltas
    assert b"999" in sent[-1] and all(not s.startswith(b"D") for s in sent[:1])


def test_an_emptied_queue_forgets_what_it_dropped_and_plain_messages_are_untouched() -> None:
    a = Chain()
    pairs = chain_of(a, range(1, 4))
    outbox = Outbox(1, 10**6, "drop-newest")
    outbox.push(item(1))
    outbox.push(pairs[0][1])  # dropped: the chain's next delta would go full
    assert texts(outbox) == [b"1"]
    # Emptied: from here the hub decides (a drop count that changed means a full text).
    outbox.push(pairs[1][1])
    assert [i.text.split()[0] for i in outbox.pop_batch(10**9)] == [b"D2"]
