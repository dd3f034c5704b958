"""The benchmark tools run: the guide's baseline server delivers what the gateway delivers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fanout import medians, start_server
from bench.neighbour import SPIN
from bench.regression import CPU_VS_1WRITE, measure_latency, measure_ratio
from bench.targets import CPU_VS_GUIDE, OPEN_ISSUES, pick, targets
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


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` in a session of its own: if it overruns ``timeout`` the whole
    session is killed, the Redis, servers and load clients it started included (killing the
    driver alone would leave them running on ports and CPUs the next tests use)."""
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:  # the timeout, or the test's own timeout interrupting the wait
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_idle_memory_bench_runs() -> None:
    result = bench("bench.idle_memory", "--connections", "50", timeout=100)
    assert result.returncode == 0, result.stderr
    assert "50 idle connections:" in result.stdout and "KiB each" in result.stdout


def test_the_footprint_bench_runs() -> None:
    """``python -m bench.footprint``, small: the figures of docs/limits.md's presence and
    idempotency rows come out, and a 1 KB info costs more than none in Redis."""
    result = bench(
        "bench.footprint", "--members", "50", "--messages", "300", "--key", "128", timeout=100
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    small, large = figures["presence"]
    assert large["redis_bytes_per_member"] > small["redis_bytes_per_member"] + 500, figures
    assert figures["idempotency"][0]["redis_bytes_per_key"] > 128, figures


def test_the_neighbour_bench_runs() -> None:
    """``python -m bench.neighbour``, small: both designs at one rate beside the spinning
    process, every message delivered, and the spinning process gone afterwards."""
    result = bench(
        "bench.neighbour", "--rounds", "1", "--rates", "50", "--subscribers", "40",
        "--seconds", "1", timeout=100,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(row["design"], row["rate"]) for row in rows] == [
        ("gateway", 50.0),
        ("gateway-window", 50.0),
    ]
    assert all(row["delivered_share"] == 1.0 for row in rows), rows
    spinning = subprocess.run(["pgrep", "-f", SPIN], capture_output=True, text=True, check=False)
    assert spinning.stdout == "", spinning.stdout


@pytest.mark.timeout(300)  # about 2 minutes on an idle 2-core machine
def test_the_whole_benchmark_runs_quick_and_writes_its_report(tmp_path: Path) -> None:
    result = bench("bench", "--quick", "--out", str(tmp_path), timeout=270)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    designs = {(r["scenario"], r["design"]) for r in report["rows"]}
    assert {("1k", d) for d in ("gateway", "gateway-window", "gateway-1write", "guide")} <= designs
    assert {("10k", "gateway"), ("10k", "guide"), ("1k-stalled", "gateway")} <= designs
    for row in report["rows"]:
        if row["design"] != "guide":  # which falls behind at 500/s on a slow or loaded machine
            assert row["delivered_share"] == 1.0, row
        assert 0 < row["delivered_share"] <= 1.0, row
        # CPU is counted in 10 ms ticks of /proc: the quick runs' 40 subscribers at 20/s may
        # cost less than one, but 40 at 500/s (20,000 deliveries) cost several.
        assert 0 <= row["cpu_us_per_delivery"] < 1000, row
        if row["scenario"] == "1k-saturation":
            assert row["cpu_us_per_delivery"] > 0, row
    # The targets are computed from these rows, each with its verdict.
    assert report["targets"] == targets(report["rows"])
    assert len(report["targets"]) == 15
    assert "## Targets" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "fanout.png").read_bytes().startswith(b"\x89PNG")


def test_repeated_runs_are_judged_by_their_medians() -> None:
    """Three runs of a design at a rate are one row of medians (a run whose p99 strayed does
    not decide); a row run once is itself; the order of first runs is kept."""

    def row(design: str, p50: float, p99: float, share: float = 1.0) -> dict[str, object]:
        return {"scenario": "1k", "design": design, "rate": 200.0, "stalled": 0,
                "latency_p50_ms": p50, "latency_p99_ms": p99, "delivered_share": share,
                "cpu_us_per_delivery": None, "sustained": False}  # fmt: skip

    rows = [row("gateway", 7.0, 20.0), row("guide", 600.0, 1800.0, 0.2),
            row("gateway", 13.0, 400.0), row("gateway", 8.0, 22.0)]  # fmt: skip
    gateway, guide = medians(rows)
    assert (gateway["design"], gateway["runs"]) == ("gateway", 3)
    assert (gateway["latency_p50_ms"], gateway["latency_p99_ms"]) == (8.0, 22.0)
    assert gateway["sustained"] and gateway["cpu_us_per_delivery"] is None
    assert guide == {**rows[1], "runs": 1, "sustained": False}


def test_the_recorded_benchmark_meets_every_documented_target() -> None:
    """bench/results/report.json is what docs/performance.md reports: each target's verdict is
    the one its rows give against today's bound, and every target is met but those of an issue
    still open, which docs/performance.md lists as missed."""
    report = json.loads((Path(__file__).parent.parent / "bench/results/report.json").read_text())
    recomputed = targets(report["rows"])
    assert report["targets"] == recomputed
    missed = [t for t in recomputed if not t["met"]]
    assert [t["target"] for t in missed if t["issue"] not in OPEN_ISSUES] == []
    performance = (Path(__file__).parent.parent / "docs/performance.md").read_text()
    for target in missed:
        assert f"missed: {target['target']}" in performance


def test_a_target_missed_is_reported_as_missed() -> None:
    report = json.loads((Path(__file__).parent.parent / "bench/results/report.json").read_text())
    rows = [dict(row) for row in report["rows"]]
    guide = pick(rows, "1k", "guide", 20)["cpu_us_per_delivery"]
    for row in rows:  # the gateway at 20 msg/s now costs as much CPU as the guide
        if (row["scenario"], row["design"], row["rate"]) == ("1k", "gateway", 20):
            row["cpu_us_per_delivery"] = guide
    verdicts = {t["target"]: t["met"] for t in targets(rows)}
    recorded = {t["target"]: t["met"] for t in report["targets"]}
    changed = [name for name in verdicts if verdicts[name] != recorded[name]]
    # Both targets on the gateway's CPU at 20 msg/s: against the guide, and against before.
    assert changed == [
        "CPU per delivery, 1k subscribers, 20 msg/s, gateway / guide",
        "CPU per delivery, 1k subscribers, 20 msg/s, gateway / gateway-window (before)",
    ]
    assert all(recorded[name] for name in changed)


@pytest.mark.timeout(400)  # 90 s on an idle 2-core machine, twice that with a core busy
def test_cpu_per_delivery_against_the_guide_meets_the_documented_bound() -> None:
    """The CPU claim of docs/performance.md (bench.targets.CPU_VS_GUIDE), measured live in the
    benchmark's own scenario: 1k subscribers at 20 msg/s, three pairs, median. Slow by nature
    (about 90 s): 6,000 connections and 36 s of publishing."""
    measured = measure_ratio()
    assert measured["ratio"] <= CPU_VS_GUIDE, measured


@pytest.mark.timeout(500)  # about 130 s on an idle 2-core machine
def test_latency_at_200_msgs_a_second_meets_a_generous_bound() -> None:
    """Issue 17's latency where the replica has no headroom (1k subscribers, 200 msg/s):
    every message delivered; p50 and p99 within twice the targets, or 1.5 and 2 times the
    fixed window's in the same rounds when the machine makes that more (not holding messages
    far longer than needed); CPU per delivery well under writing each delivery on its own,
    measured beside it (holding them when it must); medians of three rounds."""
    measured = measure_latency()
    assert measured["delivered_share"] == 1.0, measured
    assert measured["p50_ms"] <= measured["p50_bound_ms"], measured
    assert measured["p99_ms"] <= measured["p99_bound_ms"], measured
    assert measured["cpu_vs_1write"] <= CPU_VS_1WRITE, measured
