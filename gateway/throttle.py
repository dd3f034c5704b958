"""Log throttling: at most one line per interval for events that can come in floods. Pure."""

from __future__ import annotations

import time

__all__ = ["Throttle"]


class Throttle:
    """``if throttle.ready(): log...``; counts what it held back so the next line can say so."""

    __slots__ = ("_last", "interval", "suppressed")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = float("-inf")
        self.suppressed = 0

    def ready(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last >= self.interval:
            self._last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count
