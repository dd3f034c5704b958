"""The benchmark tools run: the guide's baseline server delivers what the gateway delivers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fanout import start_server
from tests.harness import (
    GatewayFactory,
    RedisServer,
    client,
    envelope,
    free_port,
    recv_json,
    wait_until,
)


@pytest.fixture
def guide_port(redis_server: RedisServer) -> Iterator[int]:
    """The guide's server, a real process, reading the "bench" channel of the test Redis."""
    port = free_port()
    guide = start_server("guide", port, redis_server.url)
    try:
        wait_until(lambda: "ws:bench" in redis_server.pubsub_channels())
        yield port
    finally:
        guide.terminate()
        guide.wait(10)


async def test_guide_server_delivers_the_same_frames_as_the_gateway(
    redis_server: RedisServer, gateway_factory: GatewayFactory, guide_port: int
) -> None:
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url})
    async with (
        client(f"ws://127.0.0.1:{guide_port}/ws") as baseline,
        client(gateway.ws_url + "?channels=bench") as ours,
    ):
        await recv_json(ours)
        redis_server.publish("ws:bench", envelope("bench", {"x": [1, 2]}, mid="b1", ts=7))
        assert json.loads(await baseline.recv()) == await recv_json(ours)


def test_idle_memory_bench_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.idle_memory", "--connections", "50"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "50 idle connections:" in result.stdout and "KiB each" in result.stdout


def test_fanout_bench_runs_both_designs(tmp_path: Path) -> None:
    out = tmp_path / "fanout.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fanout",
            "--subscribers",
            "20",
            "--rates",
            "10",
            "--seconds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["design"] for r in rows] == ["gateway", "guide"]
    for row in rows:
        assert row["delivered_share"] == 1.0, row  # 10 messages to 20 subscribers, all there
        assert row["cpu_us_per_delivery"] > 0
