"""What both Redis backplanes share, without Redis: subscription confirmations (answered in
order, nothing kept after) and probes (a connection that delivers is behind, not silent)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.backplane.base import BackplaneUnavailable, Confirmations, Probe


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


async def test_a_probe_comes_back_or_the_connection_is_silent() -> None:
    probe = Probe()
    asyncio.get_running_loop().call_later(0.05, probe.arrived, b"1")
    await probe.wait(1, timeout=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await probe.wait(2, timeout=0.2)  # nothing at all came back
    assert time.monotonic() - started < 1


async def test_a_connection_that_keeps_delivering_is_behind_not_silent() -> None:
    probe = Probe()

    async def flood() -> None:  # other messages, for three probe timeouts
        for _ in range(30):
            await asyncio.sleep(0.02)
            probe.received += 1
        probe.arrived(b"1")  # the probe, at last, behind the flood

    flooding = asyncio.create_task(flood())
    await probe.wait(1, timeout=0.2)
    await flooding
