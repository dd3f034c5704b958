"""The whole system, for real: the image built, ``docker compose up`` (Redis with AOF, three
replicas, nginx, the demo publisher, Prometheus, an OTLP receiver in the collector's place),
then broken on purpose while clients connected through nginx only count every message.

The stack is started once for the module and each test leaves it whole. Without a Docker
engine, the compose plugin or images, every test here is skipped with the reason, unless
WSGATEWAY_SYSTEM_TEST=required (CI, which provisions them): then that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.client import Client, Message, Resync
from gateway.history import EMPTY_EPOCH
from tests.harness import async_wait_until, wait_until
from tests.stack import REQUIRED, Stack, unavailable

pytestmark = pytest.mark.timeout(600)

#: Checked once, when the module is collected (cheap: no image is pulled here), so that a
#: machine without Docker gets one skip line for the module, not one per test.
UNAVAILABLE = unavailable()
if UNAVAILABLE is not None and not REQUIRED:
    pytest.skip(f"system test not run: {UNAVAILABLE}", allow_module_level=True)


def _cannot_run(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"the system test is required here but {reason}")
    pytest.skip(f"system test not run: {reason}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if UNAVAILABLE is not None:  # only when required: a failure, at each test
        _cannot_run(UNAVAILABLE)
    stack = Stack(f"wsgateway-system-{uuid.uuid4().hex[:8]}")
    reason = stack.images_missing()
    if reason is not None:
        _cannot_run(reason)
    try:
        stack.up()
        yield stack
    finally:
        logs = stack.down()
        path = Path(tmp_path_factory.mktemp("system")) / "compose.log"
        path.write_text(logs)
        print(f"compose logs: {path}")


@dataclass
class Subscriber:
    """One client library connection (reconnects and resumes by itself) and what it saw."""

    client: Client
    data: list[int] = field(default_factory=list)
    resyncs: list[Resync] = field(default_factory=list)
    reconnected_at: list[float] = field(default_factory=list)  # monotonic, each reconnect


class Subscribers:
    """``count`` clients of the library on ``channel`` through the load balancer; entered
    once each is subscribed (on a history channel: knows its position)."""

    def __init__(self, stack: Stack, channel: str, count: int) -> None:
        self.channel = channel
        self.all = [
            Subscriber(Client(stack.ws_url, [channel], backoff_min=0.2, backoff_max=2.0))
            for _ in range(count)
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Subscribers:
        for subscriber in self.all:
            subscriber.client.start()
            self._tasks.append(asyncio.create_task(self._read(subscriber)))
        self._tasks.append(asyncio.create_task(self._watch()))
        history = self.channel.startswith("news.")  # compose.yaml: GATEWAY_HISTORY_CHANNELS
        await async_wait_until(
            lambda: all(
                s.client.connected.is_set() and (not history or self.channel in s.client.positions)
                for s in self.all
            ),
            30,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for subscriber in self.all:
            await subscriber.client.close()
        for task in self._tasks:  # an assertion inside a reader fails the test here
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _read(self, subscriber: Subscriber) -> None:
        async for event in subscriber.client:
            if isinstance(event, Message):
                subscriber.data.append(event.data)
            else:
                assert isinstance(event, Resync), event
                subscriber.resyncs.append(event)

    async def _watch(self) -> None:
        """Stamp each reconnect (polled every 50 ms: the curve's resolution)."""
        seen = [1] * len(self.all)  # the first connection is no reconnect
        while True:
            await asyncio.sleep(0.05)
            for index, subscriber in enumerate(self.all):
                if subscriber.client.connects > seen[index]:
                    seen[index] = subscriber.client.connects
                    subscriber.reconnected_at.append(time.monotonic())

    def moved(self) -> list[Subscriber]:
        """Those that connected again (the library's count: the watcher may not have polled
        a reconnect that happened just now)."""
        return [s for s in self.all if s.client.connects > 1]

    async def have_all(self, count: int, timeout: float = 60) -> None:
        with contextlib.suppress(TimeoutError):  # what is missing is reported below
            await async_wait_until(lambda: all(len(s.data) >= count for s in self.all), timeout)
        for index, subscriber in enumerate(self.all):
            assert subscriber.resyncs == [], (index, subscriber.resyncs)
            assert subscriber.data == list(range(count)), (
                index,
                subscriber.client.connects,
                _gaps(subscriber.data, count),
            )


def _gaps(data: list[int], count: int) -> str:
    missing = sorted(set(range(count)) - set(data))
    repeated = len(data) - len(set(data))
    disorder = sum(1 for a, b in itertools.pairwise(data) if b < a)
    return f"{len(missing)} missing ({missing[:5]}...), {repeated} repeated, {disorder} reordered"


def address(stack: Stack, container: str) -> str:
    """The replica's address as Prometheus names its target."""
    ip = stack.docker(
        "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container
    ).strip()
    return f"{ip}:8765"


async def spread_over(stack: Stack, replicas: list[str], total: int) -> dict[str, float]:
    """Wait until these replicas hold ``total`` connections between them; how many each."""

    def spread() -> dict[str, float]:
        return {r: stack.gauge(r, "wsgateway_connections_open") for r in replicas}

    await async_wait_until(lambda: sum(spread().values()) == total, timeout=60, interval=0.5)
    return spread()


async def test_clients_spread_over_the_replicas_and_a_service_publish_reaches_every_one(
    stack: Stack,
) -> None:
    replicas = stack.containers("gateway")
    assert len(replicas) == 3
    for replica in replicas:  # as compose.yaml and the Dockerfile promise: non-root, read-only
        config = stack.docker(
            "inspect", "--format", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}", replica
        )
        assert config.split() == ["10001:10001", "true"], config
    async with Subscribers(stack, "live.spread", 30) as subscribers:
        spread = await spread_over(stack, replicas, 30)
        assert min(spread.values()) >= 8, spread  # least_conn: about ten each
        out = stack.publish("live.spread", [0, 1, 2])
        assert "reached 3 gateway(s)" in out, out
        await subscribers.have_all(3, timeout=15)


async def test_a_killed_replica_s_clients_resume_on_the_others_with_nothing_lost(
    stack: Stack,
) -> None:
    replicas = stack.containers("gateway")
    async with Subscribers(stack, "news.kill", 30) as subscribers:
        await spread_over(stack, replicas, 30)
        publisher = stack.paced_publisher("news.kill", rate=50)
        await asyncio.sleep(2)
        victim = replicas[0]
        on_victim = (await spread_over(stack, replicas, 30))[victim]
        await asyncio.to_thread(stack.docker, "kill", victim)  # SIGKILL: no drain, no goodbye
        await asyncio.sleep(5)
        count = await asyncio.to_thread(publisher.stop)
        await subscribers.have_all(count)
        assert len(subscribers.moved()) == on_victim  # exactly its clients moved
    await asyncio.to_thread(stack.docker, "start", victim)
    await asyncio.to_thread(stack.wait_healthy, victim)


async def test_a_rolling_restart_loses_nothing_and_spreads_the_reconnects(stack: Stack) -> None:
    replicas = stack.containers("gateway")
    curves: list[str] = []
    async with Subscribers(stack, "news.roll", 60) as subscribers:
        await spread_over(stack, replicas, 60)
        publisher = stack.paced_publisher("news.roll", rate=20)
        for replica in replicas:
            before = {id(s): len(s.reconnected_at) for s in subscribers.all}
            start = time.monotonic()
            # docker stop: SIGTERM to the gateway as PID 1, SIGKILL after compose's
            # stop_grace_period (20 s, which compose sets as the container's stop timeout).
            await asyncio.to_thread(stack.docker, "stop", replica, timeout=60)
            took = time.monotonic() - start
            state = stack.state(replica)
            assert state["ExitCode"] == 0, state  # it drained and exited; nothing killed it
            assert 8 < took < 20, took  # the 10 s drain window, within the grace period
            times = sorted(
                t - start for s in subscribers.all for t in s.reconnected_at[before[id(s)] :]
            )
            assert times, "none of its clients reconnected"
            bins = [sum(1 for t in times if second <= t < second + 1) for second in range(21)]
            curves.append(f"{replica}: {len(times)} reconnects, per second {bins}")
            assert times[-1] - times[0] >= 5, curves[-1]  # spread over the drain window
            assert max(bins) <= len(times) / 2, curves[-1]  # never half of them at once
            await asyncio.to_thread(stack.docker, "start", replica)
            await asyncio.to_thread(stack.wait_healthy, replica)
        count = await asyncio.to_thread(publisher.stop)
        await subscribers.have_all(count)
    print("reconnect curve (seconds after docker stop):\n" + "\n".join(curves))


async def test_a_redis_restart_keeps_history_and_readiness_follows(stack: Stack) -> None:
    replicas = stack.containers("gateway")
    [redis] = stack.containers("redis")
    stack.publish("news.redis", list(range(10)))
    async with Subscribers(stack, "news.redis", 6) as subscribers:
        await asyncio.to_thread(stack.docker, "stop", redis)  # AOF written on the way down
        for replica in replicas:
            await async_wait_until(lambda r=replica: stack.readyz(r) == 503, 30, interval=0.5)
        await asyncio.to_thread(stack.docker, "start", redis)
        await asyncio.to_thread(stack.wait_healthy, redis)
        for replica in replicas:
            await async_wait_until(lambda r=replica: stack.readyz(r) == 200, 60, interval=0.5)
        stack.publish("news.redis", list(range(10, 20)))
        await async_wait_until(lambda: all(len(s.data) >= 10 for s in subscribers.all), 30)
        for subscriber in subscribers.all:  # delivery resumed: the messages after the restart
            assert subscriber.data == list(range(10, 20))
            assert subscriber.resyncs == []  # same epoch: the history was not lost
    # The demo feed outlived the outage in its container (it did not crash and restart).
    [publisher] = stack.containers("publisher")
    assert stack.state(publisher)["Running"]
    assert stack.docker("inspect", "--format", "{{.RestartCount}}", publisher).strip() == "0"
    async with Client(stack.ws_url, ["prices.demo"]) as feed:
        event = await asyncio.wait_for(anext(aiter(feed)), 10)
        assert isinstance(event, Message) and event.data["symbol"] == "DEMO"
    # History survived the restart: a new client asking from the start gets all twenty.
    late = Client(stack.ws_url, ["news.redis"])
    late.positions["news.redis"] = (0, EMPTY_EPOCH)  # "nothing seen yet": replay it all
    async with late:
        got = []
        async for event in late:
            assert isinstance(event, Message), event
            got.append(event.data)
            if len(got) == 20:
                break
        assert got == list(range(20))


async def test_prometheus_scrapes_every_replica_and_spans_reach_the_receiver(
    stack: Stack,
) -> None:
    replicas = stack.containers("gateway")
    wanted = {address(stack, r) for r in replicas}

    def scraped() -> bool:
        up = {t["labels"]["instance"] for t in stack.prometheus_targets() if t["health"] == "up"}
        series = stack.prometheus("wsgateway_connections_opened_total")
        return wanted <= up and wanted <= {r["metric"]["instance"] for r in series}

    wait_until(scraped, timeout=60, interval=1)  # DNS discovery follows restarted replicas
    async with Subscribers(stack, "news.traced", 3) as subscribers:
        stack.publish("news.traced", ["traced"])
        await async_wait_until(lambda: all(s.data for s in subscribers.all), 15)

    def linked() -> bool:
        spans = stack.received()["spans"]
        # wspublish in the publisher container reports as that service (OTEL_SERVICE_NAME).
        sent = {
            s["trace_id"]
            for s in spans
            if s["service"] == "demo-publisher" and s["name"] == "send news.traced"
        }
        return any(
            s["service"] == "wsgateway"
            and s["name"] == "process news.traced"
            and set(s["links"]) & sent
            for s in spans
        )

    # The replica's span for the message links to the trace wspublish started.
    wait_until(linked, timeout=30, interval=0.5)
