"""What tracing costs on the message path: ``python -m bench.telemetry_overhead``.

A real in-process gateway (memory backplane) fans messages out to real WebSocket clients on
loopback. The gateway's own ``wsgateway.fanout.duration`` histogram (time spent handing one
message to every subscriber, span creation included when tracing is on) is compared across:
no trace exporter configured (the default: no tracer at all), tracing with every message
sampled, and tracing configured but sampled out. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import websockets
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from gateway.server import Gateway
from gateway.settings import Settings
from publisher.envelope import build_envelope


def tracing(kind: str) -> TracerProvider | None:
    if kind == "off":
        return None
    provider = TracerProvider(sampler=ALWAYS_ON if kind == "sampled" else ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return provider


async def run(kind: str, clients: int, messages: int) -> dict[str, Any]:
    reader = InMemoryMetricReader()
    gateway = Gateway(
        Settings(_cli_parse_args=[], host="127.0.0.1", port=0, log_level="warning"),
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracing(kind),
    )
    await gateway.start()
    url = f"ws://127.0.0.1:{gateway.port}/ws?channels=bench"
    sockets = [await websockets.connect(url, ping_interval=None) for _ in range(clients)]
    for ws in sockets:
        await ws.recv()
    received = 0

    async def consume(ws: Any) -> None:
        nonlocal received
        for _ in range(messages):
            await ws.recv()
            received += 1

    readers = [asyncio.create_task(consume(ws)) for ws in sockets]
    payload = build_envelope("bench", {"price": 1.2345, "pad": "x" * 80})
    for n in range(messages):
        await gateway.hub.backplane.publish("bench", payload)
        if n % 10 == 9:
            await asyncio.sleep(0.002)
    await asyncio.gather(*readers)
    data = reader.get_metrics_data()
    assert data is not None
    point = next(
        p
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "wsgateway.fanout.duration"
        for p in m.data.data_points
    )
    assert isinstance(point, HistogramDataPoint)
    for ws in sockets:
        await ws.close()
    await gateway.shutdown()
    return {
        "tracing": kind,
        "clients": clients,
        "messages": point.count,
        "deliveries": received,
        "fanout_us_per_message": point.sum / point.count * 1e6,
        "fanout_us_per_delivery": point.sum / received * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/telemetry_overhead.json"))
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for _ in range(args.rounds):  # interleaved, so drift hits every configuration alike
        for kind in ("off", "sampled", "sampled-out"):
            results.append(asyncio.run(run(kind, args.clients, args.messages)))
    best: dict[str, dict[str, Any]] = {}
    for result in results:
        kind = result["tracing"]
        if (
            kind not in best
            or result["fanout_us_per_message"] < best[kind]["fanout_us_per_message"]
        ):
            best[kind] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"when": time.strftime("%Y-%m-%d"), "runs": results, "best": best}, indent=2)
        + "\n"
    )
    base = best["off"]["fanout_us_per_message"]
    print(f"{args.clients} subscribers, {args.messages} messages, best of {args.rounds}\n")
    print("| tracing | fan-out µs/message | µs/delivery | vs no tracer |")
    print("|---|---|---|---|")
    for kind, result in best.items():
        per_message = result["fanout_us_per_message"]
        print(
            f"| {kind} | {per_message:.1f} | {result['fanout_us_per_delivery']:.2f} "
            f"| {per_message - base:+.1f} µs ({per_message / base:.2f}x) |"
        )


if __name__ == "__main__":
    main()
