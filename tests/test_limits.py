"""Load limits, stalled clients and deploys: every bound holds against real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RawClient,
    RedisServer,
    async_wait_until,
    client,
    envelope,
    recv_json,
    request,
    rss_kib,
)


async def test_connection_limit_answers_503_and_frees_slots(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory({"GATEWAY_MAX_CONNECTIONS": "3"})
    await full_at(gateway, 3, lambda: gateway.metric("wsgateway_connections_open") == 2)
    assert gateway.metric("wsgateway_handshakes_refused_total", reason="capacity") == 1


async def full_at(gateway: GatewayProcess, count: int, freed: Callable[[], bool]) -> None:
    """``count`` clients get in and the next is answered 503; when one leaves (``freed``
    says when the replica has its slot back), a new client gets in again."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(gateway.ws_url)) for _ in range(count)]
        with pytest.raises(InvalidStatus) as refused:
            async with client(gateway.ws_url):
                pass
        assert refused.value.response.status_code == 503
        await clients[0].close()
        await async_wait_until(freed)
        async with client(gateway.ws_url) as again:
            assert (await request(again, {"op": "ping"}))["op"] == "pong"


async def test_rate_limit_closes_a_flooding_client_with_1008(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory({"GATEWAY_RATE_LIMIT": "10"})
    async with client(gateway.ws_url) as polite, client(gateway.ws_url) as flood:
        for n in range(12):  # 10/s for a little over a second: within the limit
            assert (await request(polite, {"op": "ping", "id": n}))["id"] == n
            await asyncio.sleep(0.1)
        with pytest.raises(ConnectionClosed):
            for n in range(100):
                await flood.send(json.dumps({"op": "ping", "id": n}))
            while True:
                await recv_json(flood)
        assert flood.close_code == 1008
        assert flood.close_reason == "rate limit exceeded"
        assert (await request(polite, {"op": "ping", "id": 99}))["id"] == 99


def test_a_silent_tcp_connection_is_dropped_after_the_handshake_timeout(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory({"GATEWAY_OPEN_TIMEOUT": "1"})
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the gateway, having said nothing
        assert 0.5 < time.monotonic() - started < 4


STALLED = 100
QUEUE_BYTES = 128 * 1024
WRITE_LIMIT = 8192
MESSAGE = 8 * 1024
#: What one stalled client can make the replica hold: its queue full of messages nobody else
#: holds (each stalled client has a channel of its own), and in its transport the write limit
#: plus the write that crossed it (one message).
PER_STALLED_KIB = (QUEUE_BYTES + WRITE_LIMIT + MESSAGE) // 1024
#: What does not grow with stalled clients: messages read from Redis and not yet fanned out
#: (GATEWAY_BACKLOG_BYTES, 2 MiB here), the Redis reader's buffers, the allocator's slack
#: (2 MiB: measured growth was 17.0 MB against 18.4 MB allowed).
BACKLOG_KIB = 2 * 1024
FIXED_KIB = BACKLOG_KIB + 2 * 1024


async def test_stalled_clients_are_cut_off_and_memory_stays_bounded(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """100 clients that never read, each on a channel of its own that gets 320 KB: the
    replica holds at most their queues and write buffers (PER_STALLED_KIB each; 32 MB was
    published to them), keeps the newest of each channel, and cuts them all off at the stall
    timeout with a reset; a healthy client on the first channel gets every message."""
    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_SLOW_CONSUMER_POLICY": "drop-oldest",  # a full queue alone closes nobody
            "GATEWAY_QUEUE_MAX_BYTES": str(QUEUE_BYTES),
            "GATEWAY_QUEUE_MAX_MESSAGES": "1000",  # the byte bound is the one under test
            "GATEWAY_STALL_TIMEOUT": "3",
            "GATEWAY_SEND_BUFFER": "8192",
            "GATEWAY_WRITE_LIMIT": str(WRITE_LIMIT),
            "GATEWAY_BACKLOG_BYTES": str(BACKLOG_KIB * 1024),  # a round is 800 KB
        }
    )
    stalled = [RawClient(f"{gateway.ws_url}?channels=s{i}", rcvbuf=4096) for i in range(STALLED)]
    assert gateway.process is not None
    pid = gateway.process.pid
    rounds = 40

    def publish() -> int:
        """From a thread: the healthy client reads on the test's loop meanwhile."""
        publisher = redis.Redis.from_url(redis_server.url)
        peak = rss_kib(pid)
        for n in range(rounds):
            for i in range(STALLED):
                body = {"n": n, "pad": "x" * (MESSAGE - 100)}
                publisher.publish(f"ws:s{i}", envelope(f"s{i}", body, mid=f"m{n}"))
            peak = max(peak, rss_kib(pid))
            time.sleep(0.01)
        publisher.close()
        return max(peak, rss_kib(pid))

    try:
        async with client(f"{gateway.ws_url}?channels=s0") as healthy:
            await recv_json(healthy)
            await async_wait_until(
                lambda: gateway.metric("wsgateway_backplane_channels") == STALLED
            )
            before = rss_kib(pid)
            reader = asyncio.create_task(_collect(healthy, rounds))
            peak = await asyncio.to_thread(publish)
            assert await reader == list(range(rounds))  # the healthy client got every message
            # Every stalled queue filled: the drops are what the bound saved.
            assert gateway.metric("wsgateway_deliveries_dropped_total") > STALLED * 10
            growth = peak - before
            assert growth < STALLED * PER_STALLED_KIB + FIXED_KIB, (before, peak)
            # Cut off (1013, their buffers too full for a close frame to matter), all of them.
            await async_wait_until(
                lambda: (
                    gateway.closed(1013) == STALLED
                    and gateway.metric("wsgateway_connections_open") == 1
                ),
                timeout=15,
            )
            # With a TCP reset (SO_LINGER 0): a close frame could not reach them anyway.
            assert all(raw.ends_with_reset() for raw in stalled)
    finally:
        for raw in stalled:
            raw.close()


async def _collect(ws: ClientConnection, count: int) -> list[int]:
    return [(await recv_json(ws, timeout=20))["data"]["n"] for _ in range(count)]


async def test_sigterm_drains_in_batches_spread_over_the_window(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory({"GATEWAY_DRAIN_SECONDS": "2"})
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(gateway.ws_url)) for _ in range(40)]

        async def closed_at(ws: ClientConnection) -> float:
            with contextlib.suppress(ConnectionClosed):
                await recv_json(ws, timeout=10)
            assert ws.close_code == 1001
            return time.monotonic() - signalled

        # Every client is waiting for its close before the signal, so each time is stamped
        # when its close arrives.
        waiting = [asyncio.create_task(closed_at(ws)) for ws in clients]
        await asyncio.sleep(0)
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        await async_wait_until(lambda: gateway.http("/readyz") == (503, "draining\n"))
        with pytest.raises(InvalidStatus):
            async with client(gateway.ws_url):
                pass
        times = sorted(await asyncio.gather(*waiting))
    assert times[-1] < 2 + 1.0
    assert times[-1] - times[0] > 1.0  # spread out, not all at once
    # No instant takes more than half of the clients (a fair share would be 4 in 0.2 s).
    busiest = max(sum(1 for t in times if start <= t < start + 0.2) for start in times)
    assert busiest <= 20
    assert await asyncio.to_thread(gateway.wait) == 0


async def test_a_second_signal_skips_the_rest_of_the_drain(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_DRAIN_SECONDS": "30", "GATEWAY_SHUTDOWN_TIMEOUT": "40"})
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(gateway.ws_url)) for _ in range(20)]
        gateway.signal(signal.SIGTERM)
        await async_wait_until(lambda: gateway.http("/readyz")[0] == 503)  # draining
        second = time.monotonic()
        gateway.signal(signal.SIGINT)
        for ws in clients:
            with contextlib.suppress(ConnectionClosed):
                await recv_json(ws, timeout=5)
            assert ws.close_code == 1001
        assert await asyncio.to_thread(gateway.wait) == 0
        assert time.monotonic() - second < 3


async def test_stragglers_are_cut_off_at_the_shutdown_deadline(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(
        {
            "GATEWAY_DRAIN_SECONDS": "0.5",
            "GATEWAY_CLOSE_TIMEOUT": "30",
            "GATEWAY_SHUTDOWN_TIMEOUT": "2",
        }
    )
    stubborn = RawClient(gateway.ws_url)  # never answers the close frame
    try:
        started = time.monotonic()
        gateway.signal(signal.SIGTERM)
        assert await asyncio.to_thread(gateway.wait) == 0
        assert time.monotonic() - started < 3.5
        assert "cutting off 1 connections at the shutdown deadline" in gateway.logs()
        assert stubborn.ends_with_reset()  # the effect: reset, not left to the kernel's timers
    finally:
        stubborn.close()


def file_limits(pid: int) -> list[str]:
    """A process's soft and hard RLIMIT_NOFILE, as /proc says them."""
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(line for line in limits if line.startswith("Max open files")).split()[3:5]


async def test_start_up_raises_the_soft_file_limit_and_keeps_a_reserve(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(files=(300, 400))
    assert gateway.process is not None
    assert file_limits(gateway.process.pid) == ["400", "400"]
    assert "up to 144 client sockets (256 kept for Redis and probes)" in gateway.logs()
    # The effect: 400 descriptors less the reserve of 256 is room for 144 client sockets.
    # (The /metrics request is a socket of the same port too: 143 clients and itself.)
    await full_at(gateway, 144, lambda: gateway.metric("wsgateway_sockets_open") == 144)
    assert gateway.metric("wsgateway_handshakes_refused_total", reason="descriptors") == 1
