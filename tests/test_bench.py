"""The benchmark tools run: the guide's baseline server delivers what the gateway delivers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fanout import start_server
from bench.regression import RECORD, TOLERANCE, measure_ratio
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


def test_the_whole_benchmark_runs_quick_and_writes_its_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    designs = {(r["scenario"], r["design"]) for r in report["rows"]}
    assert {("1k", "gateway"), ("1k", "gateway-1write"), ("1k", "guide")} <= designs
    assert {("10k", "gateway"), ("10k", "guide"), ("1k-stalled", "gateway")} <= designs
    for row in report["rows"]:
        assert row["delivered_share"] == 1.0, row  # a few subscribers at most 200/s: all there
        # Measured (a number, not None); may be 0: the quick runs' 40 subscribers at 20/s can
        # cost the server less than one 10 ms clock tick of /proc CPU time.
        assert row["cpu_us_per_delivery"] >= 0
    assert len(report["targets"]) == 5
    assert "## Targets" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "fanout.png").read_bytes().startswith(b"\x89PNG")


def test_cpu_per_delivery_against_the_guide_has_not_regressed() -> None:
    """Fails when the gateway's CPU per delivery, relative to the guide's design measured in
    the same run, is more than 40% worse than the ratio recorded in bench/results."""
    recorded = json.loads(RECORD.read_text())["ratio"]
    measured = measure_ratio()
    assert measured["ratio"] <= recorded * TOLERANCE, (measured, recorded)
