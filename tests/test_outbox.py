"""The per-client queue bounds and slow-consumer policies, without sockets."""

from __future__ import annotations

from gateway.outbox import Outbox
from gateway.protocol import Outbound


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
