"""A well-behaved client that measures what the others do to it: ``python -m bench.canary``.

It runs in a process of its own, beside whatever attacks or loads the gateway, and measures
what a user would notice:

* the round trip of an application ``ping`` every ``--ping-every`` seconds;
* delivery: it publishes numbered messages on its channel (through Redis with
  ``--redis-url``, else through its own WebSocket with the ``publish`` op) and checks that
  each arrives once; what is missing at the end is lost;
* how long a new connection takes: every ``--connect-every`` seconds it opens one more,
  waits for its first ``pong`` and closes it.

It prints ``ready`` once subscribed, then, at SIGTERM or after ``--duration`` seconds, one
JSON line with its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

#: Messages published this long before the end may still be on their way: not counted lost.
GRACE = 1.0


def percentiles(samples: list[float]) -> dict[str, float | int]:
    """p50, p99 and max of ``samples`` (seconds) in milliseconds."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"count": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": at(1.0)}


class Canary:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rtts: list[float] = []
        self.connects: list[float] = []
        self.connect_failures: list[str] = []
        self.published: dict[int, float] = {}  # number -> monotonic time published
        self.received: dict[int, int] = {}  # number -> times received
        self.latencies: list[float] = []
        self.disconnects: list[str] = []
        self.pongs: dict[int, asyncio.Future[float]] = {}
        self.ws: ClientConnection | None = None
        self.subscribed = asyncio.Event()
        self.announced = False
        self.unheard = 0  # published while nobody could hear it (Redis down)
        self.listened_until: float | None = None  # when the run stopped receiving
        self.window_start = 0  # index into rtts of the current report window

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        tasks = [
            asyncio.create_task(self.session(stop)),
            asyncio.create_task(self.pinger(stop)),
            asyncio.create_task(self.publisher(stop)),
            asyncio.create_task(self.connector(stop)),
        ]
        if self.args.report_every:
            tasks.append(asyncio.create_task(self.reporter()))
        await stop.wait()
        await asyncio.sleep(0)  # let the last replies in
        # Nothing is received after this: the grace counts back from here, not from the
        # report, which the closes below may delay by seconds (one message published just
        # before the stop was once counted lost that way).
        self.listened_until = time.monotonic()
        for task in tasks:
            task.cancel()
        # A task's last close may wait on a swamped replica: the report does not need it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.report()

    async def session(self, stop: asyncio.Event) -> None:
        """Stay connected and subscribed; a lost connection is reported and replaced."""
        args = self.args
        while not stop.is_set():
            try:
                async with connect(
                    args.url, ping_interval=None, open_timeout=10, close_timeout=1
                ) as ws:
                    await ws.send(json.dumps({"op": "subscribe", "channel": args.channel}))
                    self.ws = ws
                    async for text in ws:
                        self.on_frame(json.loads(text))
            except Exception as exc:
                if stop.is_set():
                    return
                self.disconnects.append(f"{type(exc).__name__}: {exc}"[:200])
            finally:
                self.ws = None
                self.subscribed.clear()
            if not stop.is_set():
                self.disconnects.append("closed")
                await asyncio.sleep(0.2)

    def on_frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "pong":
            waiter = self.pongs.pop(frame.get("id", -1), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(time.monotonic())
        elif op == "subscribed":
            if not self.subscribed.is_set():
                self.subscribed.set()
                if not self.announced:  # the first subscription only, not a resubscription
                    self.announced = True
                    print("ready", flush=True)
        elif op == "message":
            number = frame["data"]["n"]
            self.received[number] = self.received.get(number, 0) + 1
            self.latencies.append(max(0.0, time.time() - frame["data"]["t"]))

    async def pinger(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for number in range(1, 1 << 62):
            await asyncio.sleep(self.args.ping_every)
            ws = self.ws
            if ws is None or not self.subscribed.is_set():
                continue
            waiter = self.pongs[number] = loop.create_future()
            sent = time.monotonic()
            try:
                await ws.send(json.dumps({"op": "ping", "id": number}))
                async with asyncio.timeout(10):
                    self.rtts.append(await waiter - sent)
            except Exception:
                self.rtts.append(10.0)  # no answer: counted as the worst round trip
                self.pongs.pop(number, None)

    async def publisher(self, stop: asyncio.Event) -> None:
        args = self.args
        await self.subscribed.wait()
        if args.redis_url:
            from publisher import AsyncPublisher

            async with AsyncPublisher(args.redis_url) as publisher:
                await self._publish_loop(lambda data: publisher.publish(args.channel, data))
        else:

            async def publish(data: dict[str, Any]) -> int:
                if self.ws is None:
                    return 0
                await self.ws.send(
                    json.dumps({"op": "publish", "channel": args.channel, "data": data})
                )
                return 1

            await self._publish_loop(publish)

    async def _publish_loop(self, publish: Any) -> None:
        for number in range(1, 1 << 62):
            self.published[number] = time.monotonic()
            try:
                receivers = await publish({"n": number, "t": time.time()})
            except Exception:
                receivers = 0
            if receivers == 0:
                # Redis was down, or no replica was subscribed (reconnecting): pub/sub is
                # at-most-once, so this was never the gateway's to deliver.
                del self.published[number]
                self.unheard += 1
            await asyncio.sleep(1 / self.args.rate)

    async def connector(self, stop: asyncio.Event) -> None:
        args = self.args
        while True:
            await asyncio.sleep(args.connect_every)
            started = time.monotonic()
            try:
                async with asyncio.timeout(10):
                    async with connect(args.url, ping_interval=None, close_timeout=1) as ws:
                        await ws.send('{"op":"ping","id":1}')
                        await ws.recv()
                        # Connected and answered; the close that follows is not counted.
                        self.connects.append(time.monotonic() - started)
            except Exception as exc:
                self.connect_failures.append(f"{type(exc).__name__}: {exc}"[:200])

    async def reporter(self) -> None:
        """Every ``--report-every`` seconds, one line: the round trips of that window."""
        while True:
            await asyncio.sleep(self.args.report_every)
            window, self.window_start = self.rtts[self.window_start :], len(self.rtts)
            line = {"window": time.time(), "rtt_ms": percentiles(window)}
            print(json.dumps(line), flush=True)

    def report(self) -> dict[str, Any]:
        cutoff = (self.listened_until or time.monotonic()) - GRACE
        expected = [n for n, at in self.published.items() if at < cutoff]
        lost = [n for n in expected if n not in self.received]
        return {
            "published": len(expected),
            "received": sum(1 for n in expected if n in self.received),
            "lost": len(lost),
            "lost_sample": lost[:20],
            "unheard": self.unheard,
            "duplicates": sum(count - 1 for count in self.received.values()),
            "rtt_ms": percentiles(self.rtts),
            "delivery_ms": percentiles(self.latencies),
            "connect_ms": percentiles(self.connects),
            "connect_failures": len(self.connect_failures),
            "connect_failure_sample": self.connect_failures[:5],
            "disconnects": self.disconnects[:10],
        }


async def main_async(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(args.duration, stop.set)
    canary = Canary(args)
    report = await canary.run(stop)
    print(json.dumps(report), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.canary", description=__doc__)
    parser.add_argument("--url", required=True, help="ws://host:port/ws")
    parser.add_argument("--channel", default="canary")
    parser.add_argument("--redis-url", help="publish through Redis (else through the socket)")
    parser.add_argument("--rate", type=float, default=20.0, help="messages a second")
    parser.add_argument("--ping-every", type=float, default=0.1, help="seconds")
    parser.add_argument("--connect-every", type=float, default=1.0, help="seconds")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds")
    parser.add_argument(
        "--report-every", type=float, default=0, help="seconds between interim lines (0: none)"
    )
    return parser.parse_args(argv)


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(parse_args()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
