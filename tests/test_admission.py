"""Admission of sockets, without sockets: the bounds on descriptors, handshakes and bytes."""

from __future__ import annotations

from gateway.admission import Admission

REQUEST = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"


def test_sockets_beyond_the_limit_take_the_place_of_the_oldest_handshake() -> None:
    admission: Admission[str] = Admission(max_sockets=3, max_handshakes=10, max_header_bytes=100)
    assert admission.arrive("a") == (True, None)
    assert admission.arrive("b") == (True, None)
    admission.opened("a")  # a session now: never displaced
    assert admission.arrive("c") == (True, None)
    assert admission.arrive("d") == (True, "b")  # b was the oldest handshake
    admission.left("b")
    admission.opened("c")
    admission.opened("d")
    # Three sessions and no handshake to displace: refused, and not counted.
    assert admission.arrive("e") == (False, None)
    assert (admission.sockets, admission.handshakes) == (3, 0)
    admission.left("a")
    assert admission.arrive("e") == (True, None)


def test_handshakes_beyond_their_limit_displace_the_oldest_first() -> None:
    admission: Admission[int] = Admission(max_sockets=100, max_handshakes=2, max_header_bytes=100)
    displaced = [admission.arrive(n)[1] for n in range(6)]
    assert displaced == [None, None, 0, 1, 2, 3]
    assert admission.handshakes == 2
    assert admission.sockets == 6  # the displaced count until their sockets are gone
    for n in range(4):
        admission.left(n)
    assert admission.sockets == 2


def test_a_request_is_held_until_its_head_is_complete() -> None:
    admission: Admission[str] = Admission(max_sockets=10, max_handshakes=10, max_header_bytes=64)
    admission.arrive("a")
    assert admission.received("a", REQUEST[:10]) == b""
    assert admission.received("a", REQUEST[10:-1]) == b""  # the blank line straddles reads
    assert admission.received("a", REQUEST[-1:] + b"\x81") == REQUEST + b"\x81"
    # Whatever follows the head until the handshake ends is passed on and still counted.
    assert admission.received("a", b"x" * 20) == b"x" * 20
    assert admission.received("a", b"x" * 20) is None  # 31 + 1 + 40 > 64
    admission.opened("a")
    assert admission.received("a", b"y" * 1000) == b"y" * 1000  # a session: no budget


def test_a_request_over_the_budget_is_refused_before_its_head_ends() -> None:
    admission: Admission[str] = Admission(max_sockets=10, max_handshakes=10, max_header_bytes=64)
    admission.arrive("a")
    assert admission.received("a", b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 40) == b""
    assert admission.received("a", b"a" * 10) is None
    assert admission.received("a", b"\r\n\r\n") is None
