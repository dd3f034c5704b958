"""Reconnect delays: capped exponential backoff with full jitter. Pure."""

from __future__ import annotations

import random

__all__ = ["full_jitter"]


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (0 for the first): uniform in [0, min(cap, base*2^n)].

    Full jitter spreads the replicas of a fleet that lost Redis at the same instant, so they do
    not all reconnect in the same millisecond.
    """
    ceiling = min(cap, base * 2 ** min(attempt, 62))
    return (rng or random).uniform(0.0, ceiling)
