"""What an idle connection costs: one task, and a bounded amount of memory.

The library's keepalive would add a task (and ~1.5 KiB) per connection; the replica's single
sweep replaces it. The RSS test checks the documented bound (``bench.targets.IDLE_KIB`` at
10k connections, docs/performance.md) in the benchmark's own way.
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


async def test_a_connection_costs_one_task_and_keepalive_still_runs() -> None:
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
            assert gateway.tasks() == baseline + 20  # each client's request loop, nothing more
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
