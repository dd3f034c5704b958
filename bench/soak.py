"""The soak benchmark: ``python -m bench.soak`` (10 minutes by default; not a unit test).

One real gateway on one real Redis takes everything at once for ``--seconds``:

* mixed traffic: ``--subscribers`` clients (``bench.loadclient``) on a channel published at
  ``--rate`` messages a second, and a history channel published at a tenth of that; every
  client has a token (the replica requires them);
* the newer features all along: a delta channel whose document changes a little five times
  a second, its subscribers leaving and coming back every half second, each subscription
  checked against the protocol's rule; clients joining and leaving presence channels and
  reading their presence; in-band refreshes with large forged tokens;
* hostile clients all along: ping floods, unfinished handshakes with large headers,
  fragment floods, connection churn, subscribe/unsubscribe churn of fresh channel names;
* a resume storm every minute: 40 clients resume the history channel 200 messages behind;
* Redis killed and restarted (with its data) half-way through;
* a canary (``bench.canary``) measuring its ping round trip, deliveries and new connections.

It samples the gateway's RSS and open descriptors every second and writes what it saw to
``--out`` (JSON: the samples, the RSS slope per hour after the first minute, the canary's
figures window by window, every attack's report) and a chart to ``--chart``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.fanout import start_clients, stop_clients
from publisher import Publisher
from publisher.history import HistoryPolicy
from tests.harness import GatewayProcess, RedisServer
from tests.siege import Program, Sampler, attack, canary

SECRET = "soak-secret-soak-secret-soak-secret-0123"

HOSTILE: dict[str, dict[str, float | str | bool]] = {
    "pings": {"clients": 2},
    "headers": {"sockets": 200, "interval": 0.5},
    "fragments": {"clients": 1},
    "churn": {"clients": 4},
    "channels": {"clients": 1},
    "presence": {"clients": 4, "channel": "room"},
    "refresh": {"clients": 4, "size": 60_000, "secret": SECRET},
}


def token() -> str:
    """What every well-behaved (and every hostile) client connects with: any channel."""
    import jwt

    claims = {
        "sub": "soak",
        "exp": int(time.time()) + 24 * 3600,
        "channels": ["*"],
        "publish": ["*"],
        "presence": ["*"],
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def slope_mib_per_hour(samples: list[tuple[float, int, int]], skip: float) -> float:
    """Least-squares slope of RSS over time, after the first ``skip`` seconds."""
    points = [(t, kib / 1024) for t, kib, _ in samples if t >= skip]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (m - mean_m) for t, m in points)
    return cov / var * 3600 if var else 0.0


class Traffic:
    """The well-behaved load: a publisher thread on ``bench`` and the history channel."""

    def __init__(self, redis_url: str, rate: float) -> None:
        self.redis_url = redis_url
        self.rate = rate
        self.published = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        policy = HistoryPolicy(patterns=("h.*", "d.*"))  # as the gateway's: no warning
        interval = 1 / self.rate
        publisher: Publisher | None = None
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                if publisher is None:
                    publisher = Publisher(self.redis_url, history=policy)
                publisher.publish("bench", {"n": self.published, "sent": time.time()})
                if self.published % 10 == 0:
                    publisher.publish("h.soak", {"n": self.published, "pad": "x" * 1000})
                self.published += 1
            except Exception:  # Redis restarting: try again shortly
                self.failed += 1
                publisher = None
                time.sleep(0.2)
            ahead = started + self.published * interval - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    server = RedisServer(workdir / "redis", durable=True)
    server.start()
    gateway = GatewayProcess(
        workdir,
        {
            "GATEWAY_REDIS_URL": server.url,
            "GATEWAY_HISTORY_CHANNELS": "h.*,d.*",
            "GATEWAY_DELTA_CHANNELS": "d.*",
            "GATEWAY_PRESENCE_CHANNELS": "room.*",
            "GATEWAY_JOIN_LEAVE_CHANNELS": "room.*",
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_MAX_CONNECTIONS_PER_USER": "0",
            "GATEWAY_LOG_LEVEL": "info",
            "GATEWAY_RATE_LIMIT": "50",
            # The load clients count frames and answer nothing, keepalive pings included:
            # one ping each, never timed out.
            "GATEWAY_PING_TIMEOUT": "3600",
        },
    ).start()
    assert gateway.process is not None
    events: list[tuple[float, str]] = []
    reports: dict[str, list[dict[str, Any]]] = {}
    hostile: dict[str, Program] = {}
    clients = []
    traffic = Traffic(server.url, args.rate)
    sampler = Sampler(gateway.process.pid, interval=1.0)
    try:
        url = f"{gateway.ws_url}?token={token()}"
        traffic.start()
        clients = start_clients(url + "&channels=bench", args.subscribers, 0)
        watcher = canary(url, redis_url=server.url, report_every=10)
        with sampler:
            started = time.monotonic()

            def now() -> float:
                return time.monotonic() - started

            for name, options in HOSTILE.items():
                # The refresh attack brings tokens of its own (a second one is a 400).
                hostile[name] = attack(
                    name, gateway.ws_url if name == "refresh" else url, **options
                )
            hostile["deltas"] = attack(
                "deltas",
                url,
                clients=4,
                channel="d.doc",
                redis=server.url,
                size=20_000,
                rate=5,
                changed=0.05,
                churn=0.5,
            )
            events.append((now(), "hostile clients start"))
            restarted = False
            next_storm = 30.0
            while now() < args.seconds:
                time.sleep(1)
                if not restarted and now() >= args.seconds / 2:
                    events.append((now(), "Redis killed"))
                    server.kill()
                    time.sleep(2)
                    server.start()
                    events.append((now(), "Redis restarted"))
                    restarted = True
                if now() >= next_storm and now() < args.seconds - 20:
                    events.append((now(), "resume storm"))
                    storm = attack("resume", url, clients=40, behind=200, channel="h.soak")
                    time.sleep(10)
                    reports.setdefault("resume", []).append(storm.stop())
                    next_storm += 60
            for name, program in hostile.items():
                reports.setdefault(name, []).append(program.stop())
            events.append((now(), "hostile clients stop"))
            time.sleep(3)
        observed = watcher.stop()
        windows = [line for line in watcher.lines if "window" in line]
        received = stop_clients(clients)
        clients = []
    finally:
        for program in hostile.values():
            program.kill()
        if clients:
            stop_clients(clients)
        traffic.stop()
        metrics = _metrics(gateway)
        gateway.stop()
        server.stop()
    return {
        "seconds": args.seconds,
        "subscribers": args.subscribers,
        "rate": args.rate,
        "rss_mib": {
            "first": round(sampler.first_kib / 1024, 1),
            "peak": round(sampler.peak_kib / 1024, 1),
            "last": round(sampler.samples[-1][1] / 1024, 1),
            "slope_per_hour_after_60s": round(slope_mib_per_hour(sampler.samples, 60), 1),
        },
        "fds": {"first": sampler.samples[0][2], "peak": sampler.peak_fds},
        "canary": observed,
        "canary_windows": windows,
        "subscribers_received": sum(r.get("frames", 0) for r in received),
        "subscribers_closed": sum(r.get("closed", 0) for r in received),
        "published": traffic.published,
        "publish_failures": traffic.failed,
        "events": events,
        "attacks": reports,
        "metrics": metrics,
        "samples": sampler.samples,
    }


def _metrics(gateway: GatewayProcess) -> dict[str, float]:
    """The gateway's counters at the end, by every label they have."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = (
        "wsgateway_handshakes_refused_total",
        "wsgateway_connections_closed_total",
        "wsgateway_messages_shed_total",
        "wsgateway_messages_malformed_total",
        "wsgateway_backplane_reconnects_total",
        "wsgateway_history_total",
        "wsgateway_deliveries_dropped_total",
    )
    try:
        _, text = gateway.http("/metrics")
    except OSError:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    figure, (memory, latency) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    times = [t for t, _, _ in samples]
    memory.plot(times, [kib / 1024 for _, kib, _ in samples], color="tab:blue", label="RSS (MiB)")
    memory.set_ylabel("gateway RSS, MiB")
    descriptors = memory.twinx()
    descriptors.plot(times, [fds for _, _, fds in samples], color="tab:gray", linewidth=0.8)
    descriptors.set_ylabel("open descriptors", color="tab:gray")
    for when, what in result["events"]:
        for axes in (memory, latency):
            axes.axvline(when, color="tab:red" if "Redis" in what else "tab:orange",
                         linewidth=0.8, linestyle="--")  # fmt: skip
        if "storm" not in what:
            memory.text(when, memory.get_ylim()[1], what, rotation=90, va="top", fontsize=7)
    windows = result["canary_windows"]
    if windows:
        first = windows[0]["window"] - 10
        offset = next((t for t, what in result["events"] if what == "hostile clients start"), 0)
        xs = [w["window"] - first + offset - 10 for w in windows]
        for key, style in (("p50", ":"), ("p99", "-"), ("max", "--")):
            latency.plot(xs, [w["rtt_ms"].get(key, 0) for w in windows], linestyle=style,
                         color="tab:green", label=f"canary ping {key}")  # fmt: skip
    latency.set_yscale("log")
    latency.set_ylabel("canary round trip, ms (10 s windows)")
    latency.set_xlabel("seconds (dashed: resume storms in orange, Redis restart in red)")
    latency.legend(loc="upper right", fontsize=8)
    figure.suptitle(
        f"{result['seconds']:.0f} s soak: {result['subscribers']} subscribers at "
        f"{result['rate']:.0f} msg/s, hostile clients, resume storms, a Redis restart"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50, help="messages a second on bench")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    parser.add_argument("--chart", type=Path, default=Path("bench/results/soak.png"))
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    chart(result, args.chart)
    summary = {k: v for k, v in result.items() if k not in ("samples", "canary_windows")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
