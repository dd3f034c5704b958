"""How long a busy channel's messages wait so that they go out together: the coalescing policy.

Writing a message to a client costs a system call, about the same for 200 bytes as for 2,000,
so one write carrying several messages is the cheapest fan-out there is. But to write several
at once the first has to wait for the next, and that wait is latency. The hub holds a
channel's messages for at most :attr:`Coalescing.window` seconds after its last write (the
first message after a quiet spell goes at once); this module decides that window.

- ``adaptive`` (the default) writes through, no window, while the replica has the CPU for it.
  Ten times a second it is told the replica's load: the share of a core the process used
  plus the share of the time its loop waited for a CPU (a busy neighbour on its core leaves it
  half: it uses 0.5 of a core while saturated, and waits the other half), or the loop's lag
  when that is worse (a process throttled by its CPU quota uses little and runs late). When
  the load, smoothed over about half a second, passes ``busy``, the window opens and is
  steered, in steps in proportion to the distance, to where the load is two thirds of
  ``busy``: batching only as much as keeps the core out of saturation, never beyond
  ``ceiling``. It closes when that load falls so low that it needs no window, or when a probe
  finds that writing through fits again: every few seconds, if writing through would cost
  less than a core by an estimate that errs high, one interval is written through and its load
  decides. (The estimate alone cannot decide: a write costs the kernel less the more of them
  there are, so the load of a replica holding messages overstates what writing through costs.)
  Within a window, a channel's messages go out as soon as they are as many as the window
  gathers at the channel's rate (:func:`gathered`, from its mean time between messages,
  :func:`next_gap`): a steady stream is written the moment a window's worth has arrived, not
  when a timer set from its last write ends, which its next message tends to just miss
  (the write it triggers delays reading that message) and then waits a whole window more.
- ``window``: always ``ceiling`` (the fixed window of earlier versions), written the same way.
- ``off``: every message is its own write (for comparison; the most CPU per delivery).

Nothing here does I/O: the hub reads :attr:`Coalescing.window`, the replica's load sampler
(:mod:`gateway.lag`) calls :meth:`Coalescing.observe`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Coalescing", "Mode", "gathered", "next_gap"]

#: Weight of the newest interval in the smoothed load: about the last half second counts.
SMOOTHING = 0.3
#: How much of the ceiling the window narrows by each interval while the load is on target.
DRIFT = 0.005
#: Intervals between two probes of writing through, while holding.
PROBE_EVERY = 30
#: Weight of the newest interval in a channel's mean time between messages (the last few).
GAP_WEIGHT = 0.25


def next_gap(gap: float, since: float, window: float) -> float:
    """A channel's mean time between messages, after one that came ``since`` seconds after
    the one before. An interval counts as at most ``window``: a channel slower than the window
    is as slow as it needs to be to have each message written alone, and its first messages
    after a quiet spell do not leave it counted slow while a burst goes on."""
    return gap + GAP_WEIGHT * (min(since, window) - gap)


def gathered(held: int, gap: float, window: float) -> bool:
    """Whether ``held`` messages, ``gap`` seconds apart on average, are as many as ``window``
    gathers: holding them longer would save no write, only add latency. Within a quarter of a
    message counts (the gap is a measurement: a stream whose messages divide the window would
    otherwise be decided by a coin toss). Always true with no window; never with no measured
    gap while there is one (the window's end decides)."""
    return (held + 0.25) * gap >= window


class Mode(StrEnum):
    ADAPTIVE = "adaptive"
    WINDOW = "window"
    OFF = "off"


class Coalescing:
    """The window the hub holds a channel's messages for, after the channel's last write."""

    __slots__ = (
        "_deliveries",
        "_held",
        "_load",
        "_restore",
        "_writes",
        "busy",
        "ceiling",
        "mode",
        "window",
    )

    def __init__(self, mode: Mode, ceiling: float, busy: float = 0.75) -> None:
        if not 0 < busy <= 1:
            raise ValueError("busy is a share of one core, in (0, 1]")
        self.mode = mode
        #: The longest window: the fixed one in ``window`` mode, the adaptive one's limit.
        self.ceiling = ceiling
        #: The share of a core above which ``adaptive`` starts holding messages.
        self.busy = busy
        #: Seconds a channel's messages may wait after its last write, now.
        self.window = ceiling if mode is Mode.WINDOW else 0.0
        self._deliveries = self._writes = 0
        self._load = 0.0  # smoothed
        self._held = 0  # intervals since the window opened or was last probed
        self._restore: float | None = None  # during a probe, the window to go back to

    @property
    def enabled(self) -> bool:
        """Whether messages that arrive together are written together at all."""
        return self.mode is not Mode.OFF

    @property
    def target(self) -> float:
        """The load a replica holding messages is steered to."""
        return self.busy * 2 / 3

    def observe(
        self,
        cpu: float,
        lag: float,
        interval: float,
        deliveries: int,
        writes: int,
        wait: float = 0.0,
    ) -> float:
        """Take one interval's load and return the window from now on.

        ``cpu`` is the share of one core the process used over the last ``interval`` seconds,
        ``wait`` the share of them its loop waited for a CPU, ``lag`` how late the loop ran a
        timer at its end; ``deliveries`` and ``writes`` are the replica's totals so far
        (messages handed to clients, socket writes).
        """
        done, self._deliveries = deliveries - self._deliveries, deliveries
        written, self._writes = writes - self._writes, writes
        if self.mode is not Mode.ADAPTIVE:
            return self.window
        load = max(cpu + wait, min(1.0, lag / interval))
        if self._restore is not None:  # the interval that ended was written through
            if load > self.busy:
                self.window = self._restore  # it does not fit: hold them again
            else:
                self._load = load
            self._restore = None
            return self.window
        self._load += SMOOTHING * (load - self._load)
        if self.window == 0:
            if self._load > self.busy:
                self._held = 0
                self.window = min(self.ceiling, self.ceiling * (self._load - self.target))
            return self.window
        if self._load < self.target / 2:  # far under: the load went, close within a second
            window = self.window / 2 if self.window > self.ceiling / 100 else 0.0
        else:
            # Steps in proportion to the distance from the target (a saturated core widens
            # a 20 ms window by 5 ms an interval, a few points move it by a fraction of a
            # millisecond), so that it settles rather than swings; and a slow drift down,
            # because past some width holding longer saves little more CPU but still costs
            # latency: the window settles at the narrowest that keeps the load at the target.
            window = self.window + self.ceiling * ((self._load - self.target) / 2 - DRIFT)
        self.window = min(self.ceiling, max(0.0, window))
        self._held += 1
        # Had every delivery been its own write, the load would have been at most about this.
        through = load * done / written if written else load
        if self.window and self._held >= PROBE_EVERY and through < 1:
            self._held = 0
            self._restore, self.window = self.window, 0.0
        return self.window
