"""The backlog between the backplane's reader and fan-out, without sockets: turns and bounds."""

from __future__ import annotations

from gateway.backlog import Backlog


def drain(backlog: Backlog) -> list[tuple[str, bytes]]:
    taken = []
    while backlog:
        taken.append(backlog.pop())
    return taken


def test_channels_take_turns_and_each_keeps_its_order() -> None:
    backlog = Backlog(max_per_channel=100, max_bytes=10**6)
    for n in range(5):
        backlog.push("flood", b"f%d" % n)
    backlog.push("quiet", b"q0")
    taken = drain(backlog)
    # The quiet channel's message goes second, not behind the whole flood.
    assert taken[:2] == [("flood", b"f0"), ("quiet", b"q0")]
    assert [p for c, p in taken if c == "flood"] == [b"f%d" % n for n in range(5)]
    assert backlog.bytes == 0 and len(backlog) == 0


def test_a_channel_over_its_bound_sheds_its_oldest() -> None:
    backlog = Backlog(max_per_channel=3, max_bytes=10**6)
    for n in range(10):
        backlog.push("flood", b"%d" % n)
    backlog.push("quiet", b"q")
    assert backlog.dropped == 7
    assert drain(backlog) == [("flood", b"7"), ("quiet", b"q"), ("flood", b"8"), ("flood", b"9")]


def test_over_the_byte_bound_the_busiest_channel_sheds() -> None:
    backlog = Backlog(max_per_channel=1000, max_bytes=100)
    backlog.push("quiet", b"q" * 10)
    for n in range(20):
        backlog.push("flood", b"%02d" % n + b"f" * 8)  # 10 bytes each
    assert backlog.bytes <= 100
    taken = drain(backlog)
    assert ("quiet", b"q" * 10) in taken  # the quiet channel lost nothing
    flood = [p[:2] for c, p in taken if c == "flood"]
    assert flood == [b"%02d" % n for n in range(11, 20)]  # the flood's newest
    # A quiet channel pushing while the flood fills the budget still costs the flood.
    backlog.push("flood", b"x" * 95)
    backlog.push("quiet", b"q" * 10)
    assert drain(backlog) == [("quiet", b"q" * 10)]


def test_a_channel_can_be_taken_out_of_turn() -> None:
    backlog = Backlog(max_per_channel=10, max_bytes=10**6)
    backlog.push("a", b"1")
    backlog.push("b", b"2")
    backlog.push("a", b"3")
    assert backlog.take("a") == [b"1", b"3"]
    assert backlog.take("a") == []
    assert drain(backlog) == [("b", b"2")]
