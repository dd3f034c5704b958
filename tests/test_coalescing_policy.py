"""The coalescing policy (gateway.coalescing): the adaptive window, fed loads as the replica's
sampler would, ten intervals a second, and when a channel's held messages are a window's worth:
no sockets, no clock."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from gateway.coalescing import PROBE_EVERY, Coalescing, Mode, gathered, next_gap
from gateway.settings import Settings

INTERVAL = 0.1
CEILING = 0.02


class Replica:
    """Totals of deliveries and writes as a replica would count them, interval by interval."""

    def __init__(self, policy: Coalescing) -> None:
        self.policy = policy
        self.deliveries = self.writes = 0

    def run(
        self,
        cpu: float,
        intervals: int = 1,
        per_write: float = 1,
        lag: float = 0.0,
        wait: float = 0.0,
    ) -> float:
        for _ in range(intervals):
            self.deliveries += int(1000 * per_write)
            self.writes += 1000
            self.policy.observe(cpu, lag, INTERVAL, self.deliveries, self.writes, wait)
        return self.policy.window


def adaptive(busy: float = 0.75) -> Replica:
    return Replica(Coalescing(Mode.ADAPTIVE, CEILING, busy))


def test_the_fixed_window_and_off_do_not_move() -> None:
    fixed, off = Replica(Coalescing(Mode.WINDOW, CEILING)), Replica(Coalescing(Mode.OFF, CEILING))
    assert fixed.run(1.0, 20) == CEILING and fixed.run(0.0, 20) == CEILING
    assert off.run(1.0, 20) == 0 and not off.policy.enabled and fixed.policy.enabled


def test_a_replica_with_cpu_to_spare_writes_through() -> None:
    replica = adaptive()
    assert replica.run(0.6, 100) == 0  # busy, but under the target: no message waits
    assert replica.run(0.7, 100) == 0
    assert replica.run(0.74, 100) == 0  # just under it, steadily


def test_a_busy_tenth_of_a_second_is_not_a_change_of_load() -> None:
    replica = adaptive()
    for _ in range(10):
        assert replica.run(1.0) == 0  # a burst of handshakes, say
        assert replica.run(0.3, 4) == 0


def test_a_saturated_replica_opens_the_window_within_half_a_second() -> None:
    replica = adaptive()
    opened = next(n for n in range(1, 20) if replica.run(1.0) > 0)
    assert opened <= 5
    assert replica.run(1.0, 20) == CEILING  # it stays saturated: the whole ceiling, no more


def test_holding_settles_where_the_load_is_two_thirds_of_busy() -> None:
    """A replica whose load falls as the window grows (a channel batching more messages a
    write): the window stops where the load meets the target, instead of swinging."""
    policy = Coalescing(Mode.ADAPTIVE, CEILING, 0.75)
    windows = []
    deliveries = writes = 0
    for _ in range(PROBE_EVERY - 1):  # short of the first probe
        load = 0.95 - 40 * policy.window  # 0.95 writing through, 0.5 at an 11 ms window
        deliveries, writes = deliveries + 2000, writes + 1000
        windows.append(policy.observe(load, 0.0, INTERVAL, deliveries, writes))
    assert policy.target == pytest.approx(0.5)
    settled = windows[-10:]
    assert max(settled) - min(settled) < 0.001
    assert 0.95 - 40 * settled[-1] == pytest.approx(0.5, abs=0.03)


def test_a_replica_whose_load_falls_goes_back_to_writing_through() -> None:
    replica = adaptive()
    replica.run(1.0, 20)
    assert replica.policy.window == CEILING
    closed = next(n for n in range(1, 30) if replica.run(0.05, per_write=10) == 0)
    assert closed <= 15  # within a second and a half


def test_a_probe_writes_through_for_one_interval_and_its_load_decides() -> None:
    """Holding at the target, the load cannot say what writing through would cost: every
    few seconds one interval is written through to find out."""
    # Writing through costs 0.9 of a core: the probe fails and the window comes back.
    replica = adaptive()
    replica.run(1.0, 5)
    windows = []
    for _ in range(3 * PROBE_EVERY):
        if replica.policy.window == 0:
            windows.append(replica.run(0.9))  # the probe's interval, written through
        else:
            windows.append(replica.run(0.5, per_write=1.5))  # at the target
    assert windows.count(0) >= 2  # it probed, more than once
    # Each time for one interval, then back to holding.
    assert all(after > 0 for probe, after in itertools.pairwise(windows) if probe == 0)
    # Writing through costs 0.6: the probe succeeds and it stays there.
    replica = adaptive()
    replica.run(1.0, 5)
    for _ in range(2 * PROBE_EVERY):
        if replica.policy.window == 0:
            replica.run(0.6)
        else:
            replica.run(0.5, per_write=1.5)
    assert replica.run(0.6, 20) == 0


def test_no_probe_where_writing_through_would_take_more_than_the_core() -> None:
    """At a million deliveries a second a probe would flood the loop: holding 25 messages a
    write at half a core, writing through would take many cores."""
    replica = adaptive()
    replica.run(1.0, 5)
    windows = [replica.run(0.55, per_write=25) for _ in range(3 * PROBE_EVERY)]
    assert min(windows) > 0


def test_a_loop_running_late_counts_as_load() -> None:
    """A replica throttled by its CPU quota uses little CPU and runs its timers late."""
    replica = adaptive()
    assert replica.run(0.3, 10, lag=0.09) > 0


def test_the_time_a_loop_waits_for_a_shared_core_counts_as_load() -> None:
    """A busy neighbour on the replica's core: the loop runs half the time and waits for the
    core the other half, saturated. Its CPU share alone (0.5) looks like headroom."""
    assert adaptive().run(0.5, 100) == 0
    assert adaptive().run(0.5, 100, wait=0.2) == 0  # it waits a little: 0.7, under 0.75
    assert adaptive().run(0.5, 5, wait=0.5) > 0


def test_busy_is_a_share_of_one_core() -> None:
    for busy in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="share of one core"):
            Coalescing(Mode.ADAPTIVE, CEILING, busy)


def steady(gap: float, window: float, messages: int, start: float = 0.0) -> float:
    """The mean gap a channel measures after ``messages`` that came ``gap`` seconds apart."""
    for _ in range(messages):
        start = next_gap(start, gap, window)
    return start


def test_a_steady_stream_is_written_when_a_windows_worth_has_arrived() -> None:
    """Messages 5 ms apart under a 20 ms window: the fourth completes the batch (a timer set
    from the last write would have to be relied on to catch it), the third does not."""
    gap = steady(0.005, 0.02, 40)
    assert gap == pytest.approx(0.005, rel=1e-3)
    assert gathered(4, gap, 0.02) and not gathered(3, gap, 0.02)
    # Measured a little slower or faster, the same: within a quarter of a message.
    assert gathered(4, gap * 0.97, 0.02) and not gathered(3, gap * 1.05, 0.02)
    # Faster than the window by far: many to a write.
    assert not gathered(19, steady(0.001, 0.02, 40), 0.02)


def test_the_gap_is_learnt_within_a_few_messages_and_from_below() -> None:
    """A channel starts with no gap: the window's end decides, as it did before the rate was
    known; and the mean follows the last few messages, so a change of rate shows in about ten."""
    assert not gathered(1000, 0.0, 0.02)
    learning = steady(0.005, 0.02, 3)
    assert learning < 0.005 and not gathered(4, learning, 0.02)
    assert steady(0.001, 0.02, 10, start=0.005) == pytest.approx(0.001, abs=0.0003)


def test_a_channel_slower_than_the_window_has_each_message_written_alone() -> None:
    """An interval counts as at most the window: a slow channel is a window's worth per
    message, and a quiet spell does not leave a channel counted slow through the burst that
    follows it."""
    assert steady(10.0, 0.02, 1) == pytest.approx(0.005)  # a quiet minute weighs a window
    assert gathered(1, steady(0.5, 0.02, 40), 0.02)
    after_quiet = steady(0.001, 0.02, 4, start=0.02)
    assert not gathered(1, after_quiet, 0.02) and gathered(4, after_quiet, 0.02)


def test_with_no_window_every_message_is_a_windows_worth() -> None:
    assert gathered(1, 0.0, 0.0) and gathered(1, steady(0.005, 0.0, 10), 0.0)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("adaptive", "adaptive"), ("WINDOW", "window"), ("off", "off"), ("true", "adaptive"),
     ("False", "off")],
)  # fmt: skip
def test_gateway_coalesce_takes_a_mode_and_its_old_true_or_false(value: str, mode: str) -> None:
    """``GATEWAY_COALESCE`` was a switch before it had modes: true is now adaptive (the
    default), false still writes every message on its own."""
    assert Settings(_cli_parse_args=[], coalesce=value).coalesce == mode
    assert Mode(mode) in Mode


def test_gateway_coalesce_refuses_anything_else() -> None:
    with pytest.raises(ValidationError, match="coalesce"):
        Settings(_cli_parse_args=[], coalesce="sometimes")
