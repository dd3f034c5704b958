"""Small pure rules: channel access patterns and reconnect backoff."""

from __future__ import annotations

import random

from gateway.access import Access
from gateway.backoff import full_jitter


def test_access_patterns() -> None:
    access = Access(subscribe=("news", "prices.*"), publish=("chat:*",))
    assert access.can_subscribe("news")
    assert access.can_subscribe("prices.eur")
    assert not access.can_subscribe("prices")
    assert not access.can_subscribe("News")  # case-sensitive
    assert access.can_publish("chat:lobby")
    assert not access.can_publish("news")
    assert not Access(subscribe=()).can_subscribe("news")


def test_full_jitter_stays_under_the_growing_cap() -> None:
    rng = random.Random(7)
    for attempt in range(100):
        delay = full_jitter(attempt, 0.1, 10.0, rng)
        assert 0.0 <= delay <= min(10.0, 0.1 * 2**attempt)
    delays = [full_jitter(20, 0.1, 10.0, rng) for _ in range(1000)]
    assert max(delays) > 9.0 and min(delays) < 1.0  # spread over the whole window
