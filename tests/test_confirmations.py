"""Waiting for Redis to confirm subscriptions: answered in order, nothing kept after."""

from __future__ import annotations

import pytest

from gateway.backplane.base import BackplaneUnavailable, Confirmations


async def test_confirmations_answer_in_order_and_keep_nothing_after() -> None:
    confirmations = Confirmations()
    first, second = confirmations.expect(b"a"), confirmations.expect(b"a")
    other = confirmations.expect(b"b")
    confirmations.confirm(b"a")
    assert first.done() and not second.done()
    confirmations.confirm(b"a")
    assert second.done()
    assert len(confirmations) == 1  # only b still waits
    confirmations.forget(b"b", other)  # timed out
    assert len(confirmations) == 0
    confirmations.confirm(b"c")  # a confirmation nobody waits for leaves nothing either
    assert len(confirmations) == 0


async def test_a_lost_connection_fails_every_waiter() -> None:
    confirmations = Confirmations()
    waiters = [confirmations.expect(key) for key in (b"a", b"a", b"b")]
    confirmations.fail(BackplaneUnavailable("lost"))
    for waiter in waiters:
        with pytest.raises(BackplaneUnavailable):
            await waiter
    assert len(confirmations) == 0
