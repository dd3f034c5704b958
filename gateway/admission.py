"""Which client sockets a replica takes, decided before it reads a byte from them. Pure.

Every accepted socket costs a file descriptor, and until its opening handshake ends, a buffer
for its request that grows with what the client sends. Three bounds hold whatever clients do:

* sockets: at most ``max_sockets`` at once (the file limit minus a reserve kept for Redis,
  health checks and logs); a socket beyond it is refused at once, so clients can never
  starve the replica of the descriptors its Redis link needs;
* handshakes in flight: at most ``max_handshakes``; a new socket beyond it takes the place
  of the oldest one, so sockets that hold a handshake open (slowloris) cannot lock new
  clients out: they are the oldest, and the first to go;
* request bytes per handshake: at most ``max_header_bytes``, collected here until the
  request's head is complete and only then handed to the HTTP parser: a request that never
  ends holds one buffer of what it sent, not the parser's copies of its last header line.

The caller owns the sockets and acts on the answers (see ``gateway.session``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Admission"]

K = TypeVar("K", bound=Hashable)


class Admission(Generic[K]):
    """The sockets a replica holds; keys are whatever identifies a socket to the caller."""

    __slots__ = ("_handshakes", "max_handshakes", "max_header_bytes", "max_sockets", "sockets")

    def __init__(self, max_sockets: int, max_handshakes: int, max_header_bytes: int) -> None:
        self.max_sockets = max_sockets
        self.max_handshakes = max_handshakes
        self.max_header_bytes = max_header_bytes
        self.sockets = 0
        # Handshakes in flight, oldest first (a dict keeps insertion order): the request
        # received so far while its head is incomplete, then the count of bytes received.
        self._handshakes: dict[K, bytearray | int] = {}

    @property
    def handshakes(self) -> int:
        return len(self._handshakes)

    def arrive(self, key: K) -> tuple[bool, K | None]:
        """A new socket: (admitted, the oldest handshake it displaces, which the caller must
        close). Not admitted: no descriptor to spare and no handshake to displace; the caller
        closes it at once and does not call :meth:`left` for it."""
        evicted = None
        if self.sockets >= self.max_sockets or len(self._handshakes) >= self.max_handshakes:
            if not self._handshakes:
                return False, None
            evicted = next(iter(self._handshakes))
            del self._handshakes[evicted]
        self.sockets += 1
        self._handshakes[key] = bytearray()
        return True, evicted

    def received(self, key: K, data: bytes) -> bytes | None:
        """``data`` arrived from ``key``: return what to hand to the HTTP parser now, or None
        once ``key`` is over the header budget (the caller answers 431 and closes it).

        While the request's head (up to its blank line) is incomplete that is nothing;
        then the whole head at once (with whatever followed it); after that, ``data``.
        """
        state = self._handshakes.get(key)
        if state is None:
            return data  # no longer in its handshake
        if isinstance(state, int):
            state += len(data)
            self._handshakes[key] = state
            return data if state <= self.max_header_bytes else None
        start = max(0, len(state) - 3)  # the blank line may straddle two reads
        state += data
        if len(state) > self.max_header_bytes:
            self._handshakes[key] = len(state)
            return None
        if state.find(b"\r\n\r\n", start) < 0:
            return b""
        self._handshakes[key] = len(state)
        return bytes(state)

    def opened(self, key: K) -> None:
        """``key`` finished its handshake: it no longer counts as one."""
        self._handshakes.pop(key, None)

    def left(self, key: K) -> None:
        """``key``'s socket is closed."""
        self._handshakes.pop(key, None)
        self.sockets -= 1
