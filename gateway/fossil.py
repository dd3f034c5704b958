"""Fossil deltas: make one, apply one. Pure.

The format of the Fossil SCM (https://fossil-scm.org/home/doc/tip/www/delta_format.wiki),
which the reference WebSocket server's delta compression and its client SDKs use, so any
client with a Fossil library can apply what the gateway sends. A delta is text::

    <target length>\\n <command>... <checksum>;

with numbers in a base 64 of ``0-9 A-Z _ a-z ~``; a command copies ``<n>@<offset>,`` bytes
of the source or inserts ``<n>:<n bytes>`` of its own; the checksum is the sum of the target's
big-endian 32-bit words (the last one padded with zeros), modulo 2^32.

:func:`create` finds copies the way Fossil does (the source in aligned blocks of 16 bytes,
looked up at every position of the target, each match grown both ways), with the lookups and
comparisons done by ``bytes`` and ``dict`` rather than a loop per byte: a 4 KiB document of
which a few fields changed costs tens of microseconds.
"""

from __future__ import annotations

import sys
from array import array
from typing import overload

__all__ = ["DeltaError", "apply", "checksum", "create"]

#: Bytes of the blocks the source is cut into; a shorter match is inserted, not copied.
BLOCK = 16
_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUES = {digit: value for value, digit in enumerate(_DIGITS)}


class DeltaError(ValueError):
    """The delta is malformed, or does not belong to the source it is applied to."""


def _number(n: int) -> bytes:
    if n == 0:
        return b"0"
    digits = bytearray()
    while n:
        digits.append(_DIGITS[n & 63])
        n >>= 6
    digits.reverse()
    return bytes(digits)


def checksum(data: bytes) -> int:
    words = array("I")
    words.frombytes(data + b"\0" * (-len(data) % 4))
    if sys.byteorder == "little":
        words.byteswap()
    return sum(words) & 0xFFFFFFFF


def _common(a: bytes, i: int, b: bytes, j: int) -> int:
    """How many bytes ``a[i:]`` and ``b[j:]`` share from their start: compared a slice at a
    time, halving the slice on a difference."""
    length, step = 0, 256
    limit = min(len(a) - i, len(b) - j)
    while step:
        while (
            length + step <= limit
            and a[i + length : i + length + step] == b[j + length : j + length + step]
        ):
            length += step
        step >>= 1
    return length


@overload
def create(source: bytes, target: bytes) -> bytes: ...


@overload
def create(source: bytes, target: bytes, max_insert: int) -> bytes | None: ...


def create(source: bytes, target: bytes, max_insert: int | None = None) -> bytes | None:
    """A delta that turns ``source`` into ``target``; valid UTF-8 when ``target`` is.

    With ``max_insert``, None as soon as more than that many bytes of the target are found
    in no copy of the source: the delta would save little, and each such byte costs the
    search a lookup (about 0.1 us), where the rest is compared by the slice."""
    parts = [_number(len(target)), b"\n"]
    blocks: dict[bytes, int] = {}
    for start in range(0, len(source) - BLOCK + 1, BLOCK):
        blocks.setdefault(source[start : start + BLOCK], start)
    pending = 0  # where the bytes not yet copied or inserted start
    budget = len(target) if max_insert is None else max_insert  # inserts left to make
    j = 0
    last = len(target) - BLOCK
    get = blocks.get
    while j <= last:
        i = get(target[j : j + BLOCK])
        if i is None:
            j += 1
            if j - pending > budget:
                return None
            continue
        back = 0
        while j - back > pending and i - back > 0 and target[j - back - 1] == source[i - back - 1]:
            back += 1
        count = back + BLOCK + _common(source, i + BLOCK, target, j + BLOCK)
        start = j - back
        # Copies start and end on UTF-8 character boundaries, so that what is inserted is
        # whole characters: the delta of a text is a text (sent as a JSON string).
        while count and 0x80 <= target[start] < 0xC0:
            start, back, count = start + 1, back - 1, count - 1
        while count and start + count < len(target) and 0x80 <= target[start + count] < 0xC0:
            count -= 1
        if count < BLOCK // 2:
            j += 1
            continue
        if start > pending:
            budget -= start - pending
            parts += (_number(start - pending), b":", target[pending:start])
        parts += (_number(count), b"@", _number(i - back), b",")
        j = pending = start + count
    if pending < len(target):
        if len(target) - pending > budget:
            return None
        parts += (_number(len(target) - pending), b":", target[pending:])
    parts += (_number(checksum(target)), b";")
    return b"".join(parts)


def _read(delta: bytes, at: int) -> tuple[int, int]:
    value, start = 0, at
    values = _VALUES
    while at < len(delta):
        digit = values.get(delta[at])
        if digit is None:
            break
        value = (value << 6) | digit
        at += 1
    if at == start:
        raise DeltaError(f"a number expected at byte {at}")
    return value, at


def apply(source: bytes, delta: bytes) -> bytes:
    """The target ``delta`` makes of ``source``; DeltaError if it cannot (a corrupt delta,
    or one made against another source: the checksum tells)."""
    size, at = _read(delta, 0)
    if delta[at : at + 1] != b"\n":
        raise DeltaError("the target size must end with a newline")
    at += 1
    out = bytearray()
    while at < len(delta):
        count, at = _read(delta, at)
        command = delta[at : at + 1]
        at += 1
        if command == b"@":
            offset, at = _read(delta, at)
            if delta[at : at + 1] != b",":
                raise DeltaError("a copy must end with a comma")
            at += 1
            if offset + count > len(source):
                raise DeltaError("a copy reaches past the end of the source")
            out += source[offset : offset + count]
        elif command == b":":
            if at + count > len(delta):
                raise DeltaError("an insert reaches past the end of the delta")
            out += delta[at : at + count]
            at += count
        elif command == b";":
            if len(out) != size:
                raise DeltaError(f"made {len(out)} bytes, the delta says {size}")
            if count != checksum(bytes(out)):
                raise DeltaError("checksum mismatch: not the source this delta was made from")
            return bytes(out)
        else:
            raise DeltaError(f"unknown command {command!r}")
        if len(out) > size:
            raise DeltaError("the delta makes more bytes than it says")
    raise DeltaError("the delta has no checksum")
