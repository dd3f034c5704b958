"""Load limits, stalled clients and deploys: every bound holds against real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import (
    GatewayFactory,
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
    async with contextlib.AsyncExitStack() as stack:
        first = [await stack.enter_async_context(client(gateway.ws_url)) for _ in range(3)]
        with pytest.raises(InvalidStatus) as caught:
            async with client(gateway.ws_url):
                pass
        assert caught.value.response.status_code == 503
        await first[0].close()
        await asyncio.sleep(0.2)
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


async def test_stalled_clients_are_cut_off_and_memory_stays_bounded(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    queue_bytes = 64 * 1024
    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_SLOW_CONSUMER_POLICY": "drop-oldest",  # a full queue alone closes nobody
            "GATEWAY_QUEUE_MAX_BYTES": str(queue_bytes),
            "GATEWAY_STALL_TIMEOUT": "1.5",
            "GATEWAY_SEND_BUFFER": "8192",
            "GATEWAY_WRITE_LIMIT": "8192",
        }
    )
    url = gateway.ws_url + "?channels=feed"
    stalled = [RawClient(url, rcvbuf=4096) for _ in range(20)]
    try:
        async with client(url) as healthy:
            await recv_json(healthy)
            assert gateway.process is not None
            pid = gateway.process.pid
            before = rss_kib(pid)
            publisher = redis.asyncio.Redis.from_url(redis_server.url)
            pad = "x" * 8000
            count = 2000  # 16 MB to each of 20 clients that never read
            reader = asyncio.create_task(_collect(healthy, count))
            peak = before
            for n in range(count):
                if n % 100 == 0:
                    peak = max(peak, rss_kib(pid))
                body = {"n": n, "pad": pad}
                await publisher.publish("ws:feed", envelope("feed", body, mid=f"m{n}"))
                await asyncio.sleep(0.002)  # ~4 MB/s: a pace the healthy client keeps up with
            peak = max(peak, rss_kib(pid))
            assert await reader == list(range(count))  # the healthy client got every message
            await publisher.aclose()
            # Per stalled client at most: its queue, one coalesced write and the write buffer.
            bound_kib = 20 * (queue_bytes + 2 * 8192 + 8192) // 1024 + 8 * 1024
            assert peak - before < bound_kib, (before, peak)
            await async_wait_until(
                lambda: gateway.logs().count("cutting off stalled client") >= 20, timeout=10
            )
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
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)

        async def closed_at(ws) -> float:  # type: ignore[no-untyped-def]
            with contextlib.suppress(ConnectionClosed):
                await recv_json(ws, timeout=10)
            assert ws.close_code == 1001
            return time.monotonic() - signalled

        await asyncio.sleep(0.3)
        assert gateway.http("/readyz") == (503, "draining\n")
        with pytest.raises(InvalidStatus):
            async with client(gateway.ws_url):
                pass
        times = sorted(await asyncio.gather(*(closed_at(ws) for ws in clients)))
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
        await asyncio.sleep(0.5)
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
    finally:
        stubborn.close()


def test_start_up_raises_the_soft_file_limit_to_the_hard_one(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(files=(512, 2048))
    assert gateway.process is not None
    limits = Path(f"/proc/{gateway.process.pid}/limits").read_text().splitlines()
    line = next(line for line in limits if line.startswith("Max open files"))
    assert line.split()[3:5] == ["2048", "2048"], line
    # What the reserve leaves for clients is said once at start-up.
    assert "up to 1792 client sockets (256 kept for Redis and probes)" in gateway.logs()
