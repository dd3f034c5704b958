"""Delta compression of one channel: each message as its full text and as a Fossil delta
against the message before it, made once for every subscriber that takes deltas. Pure.

A subscriber that negotiated deltas gets, on a channel that allows them, the full text first
(its base), then deltas as long as it holds the message before each (nothing dropped, no
gap): the hub knows, and sends the full text again whenever it cannot be sure.
"""

from __future__ import annotations

from gateway import fossil
from gateway.envelope import Envelope
from gateway.protocol import Outbound, text_message

__all__ = ["DeltaChain"]


class DeltaChain:
    """The last numbered message of a channel, as the base of the next one's delta."""

    __slots__ = ("epoch", "offset", "text")

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.offset = 0
        self.text: bytes | None = None

    def add(self, envelope: Envelope) -> tuple[Outbound, Outbound | None]:
        """``envelope`` (numbered) as a full text frame, and as a delta frame when it
        follows the last one (None otherwise: a gap, a new epoch, the first one)."""
        text = bytes(envelope.data)
        full = text_message(envelope, text, delta=False)
        delta = None
        if (
            self.text is not None
            and envelope.epoch == self.epoch
            and envelope.offset == self.offset + 1
        ):
            delta = text_message(envelope, fossil.create(self.text, text), delta=True)
        self.epoch, self.offset, self.text = envelope.epoch, envelope.offset or 0, text
        return full, delta
