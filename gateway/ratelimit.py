"""Inbound message rate limit: a token bucket per connection. Pure."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; each message takes one.

    Starts full, so a client may send ``burst`` messages at once after connecting.
    """

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        """Take one token at time ``now``; False when the bucket is empty."""
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True
