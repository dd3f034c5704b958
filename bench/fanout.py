"""Fan-out benchmark, this gateway against the guide's design in the same run.

``python -m bench.fanout [--subscribers 1000] [--rates 20,200] [--seconds 10]``

For each design and publish rate: a fresh server process pinned to CPU 0, load-client
processes (``bench.loadclient``) pinned to CPU 1 holding the subscribers, and a publisher in
this process sending ``{"sent": <time>, "pad": ...}`` (128-byte payloads) on one Redis channel
at a fixed rate. Reported per run: deliveries per second, server CPU microseconds per delivery
(user + system time of the server process over the publishing window), delivery latency
p50/p99/max (from a sample of connections), server RSS per idle connection, and the share of
messages delivered. Results go to ``bench/results/fanout.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.harness import RedisServer, free_port, rss_kib, wait_until

SERVER_CPU = 0
CLIENT_CPU = 1 if (os.cpu_count() or 1) > 1 else 0
PER_CLIENT_PROCESS = 5000  # well under the 20 000 files one process may open
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


#: The designs measured: this gateway as configured by default (adaptive coalescing), with
#: the fixed 20 ms window of earlier versions, writing every delivery on its own (its
#: coalescing off), and the guide's design.
DESIGNS: dict[str, dict[str, str]] = {
    "gateway": {},
    "gateway-window": {"GATEWAY_COALESCE": "window"},
    "gateway-1write": {"GATEWAY_COALESCE": "off"},
    "guide": {},
}


def start_server(
    design: str, port: int, redis_url: str | None = None, **settings: str
) -> subprocess.Popen[bytes]:
    """A real server process pinned to the server CPU, returned once it accepts clients.

    ``gateway`` runs ``python -m gateway`` (on Redis when ``redis_url`` is given, else the
    memory backplane; ``settings`` are extra GATEWAY_* variables on top of the design's own);
    ``guide`` runs the guide's design on the Redis channel ``bench``.
    """
    if design != "guide":
        settings = {**DESIGNS[design], **settings}
        env = {
            **os.environ,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_MAX_CONNECTIONS": "100000",
            "GATEWAY_RATE_LIMIT": "1000",
            **({"GATEWAY_REDIS_URL": redis_url} if redis_url else {}),
            **settings,
        }
        server = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
        os.sched_setaffinity(server.pid, {SERVER_CPU})
        wait_until(lambda: _ready(port), timeout=30)
        return server
    assert redis_url is not None, "the guide's server reads Redis"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.guide_server",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--channel",
            "bench",
        ],
        stdout=subprocess.PIPE,
    )
    os.sched_setaffinity(server.pid, {SERVER_CPU})
    assert server.stdout is not None
    assert b"guide server" in server.stdout.readline()
    return server


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_clients(url: str, subscribers: int, stalled: int) -> list[subprocess.Popen[str]]:
    clients = []
    remaining, index = subscribers, 0
    while remaining > 0:
        count = min(PER_CLIENT_PROCESS, remaining)
        args = [
            sys.executable,
            "-m",
            "bench.loadclient",
            "--url",
            url,
            "--connections",
            str(count),
            "--stalled",
            str(stalled if index == 0 else 0),
            "--source",
            f"127.0.0.{index + 1}",
            "--spin",
        ]
        client = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        os.sched_setaffinity(client.pid, {CLIENT_CPU})
        clients.append(client)
        remaining -= count
        index += 1
    for client in clients:
        assert client.stdout is not None
        line = json.loads(client.stdout.readline())
        assert line["event"] == "connected", line
    return clients


def connect_idle(
    pid: int, url: str, subscribers: int, stalled: int = 0, settle: float = 2.0
) -> tuple[list[subprocess.Popen[str]], float]:
    """Connect the subscribers; return their client processes and the server's RSS growth
    per connection, in KiB, once they are all connected and idle for ``settle`` seconds:
    by default long enough for the gateway to take the handshakes' load as past, as a
    replica that has not just had a connection storm would (its coalescing window closed)."""
    time.sleep(0.5)
    before = rss_kib(pid)
    clients = start_clients(url, subscribers, stalled)
    time.sleep(settle)
    return clients, (rss_kib(pid) - before) / subscribers


def stop_clients(clients: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    results = []
    for client in clients:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.close()
        results.append(json.loads(client.stdout.readline()))
        client.wait(30)
    return results


def run(
    design: str,
    redis_server: RedisServer,
    subscribers: int,
    rate: float,
    seconds: float,
    stalled: int,
    settings: dict[str, str] | None = None,
    settle: float = 2.0,
    payload: int = 128,
) -> dict[str, Any]:
    port = free_port()
    server = start_server(design, port, redis_server.url, **(settings or {}))
    try:
        url = f"ws://127.0.0.1:{port}/ws?channels=bench"
        clients, idle_kib = connect_idle(server.pid, url, subscribers, stalled, settle)
        publisher = redis.Redis.from_url(redis_server.url)
        for _ in range(100):
            if publisher.pubsub_numsub("ws:bench")[0][1] >= 1:
                break
            time.sleep(0.05)
        pad = "x" * (payload - 38)  # with "sent", a JSON payload of ``payload`` bytes
        messages = int(rate * seconds)
        cpu_start = cpu_seconds(server.pid)
        started = time.monotonic()
        for n in range(messages):
            target = started + n / rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            envelope = {
                "v": 1,
                "channel": "bench",
                "data": {"sent": time.time(), "pad": pad},
                "mid": f"m{n}",
                "ts": int(time.time() * 1000),
            }
            publisher.publish("ws:bench", json.dumps(envelope, separators=(",", ":")))
        elapsed = time.monotonic() - started
        time.sleep(2.0)  # let queued deliveries drain
        user, system = (b - a for a, b in zip(cpu_start, cpu_seconds(server.pid), strict=True))
        cpu = user + system
        results = stop_clients(clients)
        publisher.close()
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            # The guide's shutdown awaits close() on clients that may never drain.
            server.kill()
            server.wait(5)
    deliveries = sum(r["frames"] for r in results)
    latency = sorted(x for r in results for x in r["latency"])
    healthy = subscribers - stalled
    return {
        "design": design,
        "subscribers": subscribers,
        "payload": payload,
        "stalled": stalled,
        "rate": rate,
        "messages": messages,
        "deliveries": deliveries,
        "deliveries_per_second": deliveries / elapsed,
        "cpu_us_per_delivery": cpu * 1e6 / deliveries if deliveries else None,
        "cpu_system_share": system / cpu if cpu else None,
        "server_cpu_share": cpu / (elapsed + 2.0),
        "latency_p50_ms": statistics.median(latency) * 1e3 if latency else None,
        "latency_p99_ms": latency[int(len(latency) * 0.99)] * 1e3 if latency else None,
        "latency_max_ms": latency[-1] * 1e3 if latency else None,
        "rss_kib_per_idle_connection": idle_kib,
        "delivered_share": deliveries / (messages * healthy) if messages else None,
    }


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| design | subscribers | stalled | msg/s | deliveries/s | CPU µs/delivery | "
        "p50 ms | p99 ms | max ms | KiB/idle conn | delivered |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['design']} | {r['subscribers']} | {r['stalled']} | {r['rate']:g} | "
            f"{r['deliveries_per_second']:.0f} | {_cell(r['cpu_us_per_delivery'], 2)} | "
            f"{_cell(r['latency_p50_ms'])} | {_cell(r['latency_p99_ms'])} | "
            f"{_cell(r['latency_max_ms'])} | {_cell(r['rss_kib_per_idle_connection'])} | "
            f"{_cell(r['delivered_share'], 4)} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Scenario:
    name: str
    subscribers: int
    designs: tuple[str, ...]
    rates: tuple[float, ...]
    stalled_percent: float = 0
    #: Stop a design's rates at the first one it does not sustain.
    until_saturated: bool = False
    #: With stalled clients: runs without and with them, alternately, this many times each
    #: (p99 moves between identical runs; the medians of several pairs are what is compared).
    pairs: int = 1
    #: Seconds between the last handshake and the first message (see connect_idle).
    settle: float = 2.0
    #: Runs of each design at each rate, interleaved (see medians).
    repeats: int = 1
    #: Bytes of each message's JSON payload.
    payload: int = 128


def sweep(
    scenario: Scenario,
    redis_server: RedisServer,
    seconds: float,
    settings: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every run of a scenario, the designs side by side at each rate (same conditions)."""
    stalled = int(scenario.subscribers * scenario.stalled_percent / 100)
    variants = [0, stalled] * scenario.pairs if stalled else [0]
    rows: list[dict[str, Any]] = []
    saturated: set[str] = set()
    for rate in scenario.rates:
        for _ in range(scenario.repeats):
            for design in scenario.designs:
                for stalled_now in variants:
                    if design in saturated:
                        continue
                    row = run(
                        design,
                        redis_server,
                        scenario.subscribers,
                        rate,
                        seconds,
                        stalled_now,
                        settings,
                        scenario.settle,
                        scenario.payload,
                    )
                    row["scenario"] = scenario.name
                    row["sustained"] = sustained(row)
                    rows.append(row)
                    print(f"{scenario.name:14} {table([row]).splitlines()[-1]}", flush=True)
                    if scenario.until_saturated and not row["sustained"]:
                        saturated.add(design)
    return rows


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario, design, rate and number of stalled clients, each figure the median
    of its runs, in the order of their first runs: on this VM latency moves between identical
    runs (p99 by a factor of 2 or more), so a verdict is read off several."""
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row.get("scenario"), row["design"], row["rate"], row["stalled"])
        runs.setdefault(key, []).append(row)
    merged = []
    for same in runs.values():
        row = {**same[0], "runs": len(same)}
        for field, value in same[0].items():
            if isinstance(value, float) and all(r[field] is not None for r in same):
                row[field] = statistics.median(r[field] for r in same)
        row["sustained"] = sustained(row)
        merged.append(row)
    return merged


def bench_redis(workdir: Path) -> RedisServer:
    """A Redis for the benchmark, on the load clients' CPU like this driver, off the server's."""
    os.sched_setaffinity(0, {CLIENT_CPU})
    redis_server = RedisServer(workdir / "redis")
    redis_server.start()
    assert redis_server.process is not None
    os.sched_setaffinity(redis_server.process.pid, {CLIENT_CPU})
    return redis_server


@contextlib.contextmanager
def scratch_redis() -> Iterator[RedisServer]:
    """:func:`bench_redis` in a temporary directory, stopped and removed on the way out."""
    with tempfile.TemporaryDirectory() as workdir:
        redis_server = bench_redis(Path(workdir))
        try:
            yield redis_server
        finally:
            redis_server.stop()


def sustained(row: dict[str, Any]) -> bool:
    """Kept up: p99 latency under 250 ms and (nearly) every message delivered."""
    p99, share = row["latency_p99_ms"], row["delivered_share"]
    return p99 is not None and p99 < 250 and share is not None and share >= 0.999


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rates", default="20,200")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--stalled-percent", type=float, default=0)
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument(
        "--until-saturated",
        action="store_true",
        help="stop a design's rates at the first one it does not sustain",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="GATEWAY_X=value for the gateway designs"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/fanout.json"))
    args = parser.parse_args()
    scenario = Scenario(
        "cli",
        args.subscribers,
        tuple(args.designs.split(",")),
        tuple(float(r) for r in args.rates.split(",")),
        args.stalled_percent,
        args.until_saturated,
    )
    settings = dict(setting.split("=", 1) for setting in args.set)
    with scratch_redis() as redis_server:
        rows = sweep(scenario, redis_server, args.seconds, settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report(rows), indent=2) + "\n")
    print()
    print(table(rows))


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "rows": rows,
    }


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs, {model}, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    main()
