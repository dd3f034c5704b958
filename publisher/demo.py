"""A demo feed for the local system: ``python -m publisher.demo``.

Publishes a random-walk price on ``prices.demo`` twice a second and a headline on ``news.demo``
every five seconds, until stopped.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from types import FrameType

from redis.exceptions import RedisError

from publisher import otlp
from publisher.client import Publisher

__all__ = ["main"]

log = logging.getLogger("publisher.demo")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    price, tick = 100.0, 0
    tracing = otlp.tracing_from_env("demo-publisher")
    with Publisher(tracer_provider=tracing) as publisher:
        while running:
            price = round(price * (1 + random.gauss(0, 0.001)), 4)
            try:
                publisher.publish("prices.demo", {"symbol": "DEMO", "price": price})
                if tick % 10 == 0:
                    publisher.publish("news.demo", {"headline": f"tick {tick}: DEMO at {price}"})
            except (RedisError, OSError) as exc:
                # A feed outlives a Redis restart: skip this tick, try again at the next.
                log.warning("cannot publish (%s); trying again", exc)
            tick += 1
            time.sleep(0.5)
    if tracing is not None:
        tracing.shutdown()


if __name__ == "__main__":
    main()
