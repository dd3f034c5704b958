"""What an idle connection costs: no task, and a bounded amount of memory.

The library's keepalive would add a task (and ~1.5 KiB) per connection, and its handler task
another (with the request loop waiting in it, ~1.6 KiB); the replica's single sweep replaces
the first, and requests are served by a task that exists only while some are waiting. The RSS
test checks the documented bound (``bench.targets.IDLE_KIB`` at 10k connections,
docs/performance.md) in the benchmark's own way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from bench.fanout import connect_idle, stop_clients
from bench.targets import IDLE_KIB
from tests.harness import (
    GatewayFactory,
    ThreadedGateway,
    async_wait_until,
    client,
    recv_json,
)


async def test_an_idle_connection_costs_no_task_and_keepalive_still_runs() -> None:
    gateway = ThreadedGateway(ping_interval=0.2, ping_timeout=5, log_level="warning").start()
    try:
        baseline = gateway.tasks()
        async with contextlib.AsyncExitStack() as stack:
            sockets = [
                await stack.enter_async_context(client(gateway.ws_url + "?channels=idle"))
                for _ in range(20)
            ]
            for ws in sockets:
                await recv_json(ws)
            assert gateway.tasks() == baseline
            # Requests are served, in order, by a task that goes when they are done.
            for ws in sockets:
                for n in range(3):
                    await ws.send(f'{{"op":"ping","id":{n}}}')
            for ws in sockets:
                assert [(await recv_json(ws))["id"] for _ in range(3)] == [0, 1, 2]
            await async_wait_until(lambda: gateway.tasks() == baseline)
            # The sweep pings every connection: each one gets its round-trip time.
            await async_wait_until(
                lambda: (
                    gateway.call(
                        lambda: sum(s.connection.latency > 0 for s in gateway.gateway.sessions)
                    )
                    == 20
                )
            )
    finally:
        gateway.stop()


@pytest.mark.timeout(300)
def test_idle_memory_per_connection_meets_the_documented_bound(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """10,000 idle subscribers, as the documented figure is measured (two client processes):
    slow by nature, about 20 s."""
    gateway = gateway_factory({"GATEWAY_LOG_LEVEL": "warning", "GATEWAY_MAX_CONNECTIONS": "20000"})
    assert gateway.process is not None
    clients, per_connection = connect_idle(
        gateway.process.pid, gateway.ws_url + "?channels=idle", 10_000
    )
    try:
        assert gateway.metric("wsgateway_connections_open") == 10_000
    finally:
        stop_clients(clients)
    assert per_connection <= IDLE_KIB, f"{per_connection:.2f} KiB per idle connection"
