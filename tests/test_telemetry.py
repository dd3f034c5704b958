"""Traces, metrics and logs, read back from in-memory exporters injected into a real gateway
(real sockets, real Redis) and a real publisher, and from a real process's /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from gateway import lag
from gateway.logs import JsonFormatter
from gateway.telemetry import Telemetry
from publisher import AsyncPublisher
from tests.collector import GrpcCollector, HttpCollector
from tests.harness import (
    GatewayFactory,
    RawClient,
    RedisServer,
    ThreadedGateway,
    async_wait_until,
    client,
    envelope,
    recv_json,
    request,
    wait_until,
    wspublish,
)


class Observed:
    """A real in-process gateway whose metrics and spans land in memory."""

    def __init__(self, redis_server: RedisServer, **settings: Any) -> None:
        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.replica = ThreadedGateway(
            {
                "meter_provider": MeterProvider(metric_readers=[self.reader]),
                "tracer_provider": tracer_provider,
            },
            redis_url=redis_server.url,
            log_level="warning",
            **settings,
        ).start()

    def metric(self, name: str, **attributes: Any) -> float:
        """The current value (sum, gauge, or histogram count) of one stream; 0 if absent."""
        data = self.reader.get_metrics_data()
        total = 0.0
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        labels = point.attributes or {}
                        if all(labels.get(k) == v for k, v in attributes.items()):
                            if isinstance(point, HistogramDataPoint):
                                total += point.count
                            elif isinstance(point, NumberDataPoint):
                                total += point.value
        return total

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


@pytest.fixture
def observed(redis_server: RedisServer) -> Iterator[Observed]:
    gateway = Observed(redis_server, rate_limit=20)
    yield gateway
    gateway.replica.stop()


async def test_a_publish_makes_a_producer_span_and_a_linked_consumer_span(
    observed: Observed, redis_server: RedisServer
) -> None:
    publisher_spans = InMemorySpanExporter()
    publisher_tracing = TracerProvider()
    publisher_tracing.add_span_processor(SimpleSpanProcessor(publisher_spans))
    url = observed.replica.ws_url + "?channels=news"
    async with client(url) as a, client(url) as b:
        await recv_json(a)
        await recv_json(b)
        async with AsyncPublisher(redis_server.url, tracer_provider=publisher_tracing) as pub:
            assert await pub.publish("news", {"n": 1}, mid="trace-me") == 1
        for ws in (a, b):
            assert (await recv_json(ws))["mid"] == "trace-me"
    [producer] = publisher_spans.get_finished_spans()
    assert producer.name == "send news" and producer.kind is SpanKind.PRODUCER
    assert producer.attributes is not None
    assert producer.attributes["messaging.destination.name"] == "news"
    assert producer.attributes["messaging.message.id"] == "trace-me"
    await async_wait_until(lambda: observed.finished("process news"))
    [consumer] = observed.finished("process news")
    assert consumer.kind is SpanKind.CONSUMER
    assert consumer.attributes is not None
    assert consumer.attributes["messaging.system"] == "redis"
    assert consumer.attributes["messaging.destination.name"] == "news"
    assert consumer.attributes["messaging.message.id"] == "trace-me"
    assert consumer.attributes["wsgateway.deliveries"] == 2
    [link] = consumer.links
    assert producer.context is not None
    assert (link.context.trace_id, link.context.span_id) == (
        producer.context.trace_id,
        producer.context.span_id,
    )


async def test_a_control_request_is_traced_from_the_service_to_the_replica(
    observed: Observed, redis_server: RedisServer
) -> None:
    service_spans = InMemorySpanExporter()
    service_tracing = TracerProvider()
    service_tracing.add_span_processor(SimpleSpanProcessor(service_spans))
    async with AsyncPublisher(redis_server.url, tracer_provider=service_tracing) as pub:
        result = await pub.subscribe("alice", "room.1")
    assert (result.replicas, result.acknowledged, result.connections) == (1, 1, 0)
    [producer] = service_spans.get_finished_spans()
    assert producer.name == "control subscribe" and producer.kind is SpanKind.PRODUCER
    assert producer.attributes is not None
    assert producer.attributes["wsgateway.control.acknowledged"] == 1
    await async_wait_until(lambda: observed.finished("control subscribe"))
    [consumer] = observed.finished("control subscribe")
    assert consumer.kind is SpanKind.CONSUMER
    assert consumer.attributes is not None
    assert consumer.attributes["enduser.id"] == "alice"
    assert consumer.attributes["messaging.destination.name"] == "room.1"
    assert consumer.attributes["wsgateway.control.connections"] == 0
    [link] = consumer.links
    assert producer.context is not None
    assert link.context.trace_id == producer.context.trace_id
    assert observed.metric("wsgateway.control.requests", op="subscribe", result="ok") == 1


async def test_counters_move_by_exactly_the_expected_amounts(
    observed: Observed, redis_server: RedisServer
) -> None:
    o = observed
    url = o.replica.ws_url
    async with client(url + "?channels=news") as a, client(url + "?channels=news") as b:
        await recv_json(a)
        await recv_json(b)
        assert o.metric("wsgateway.connections.open") == 2
        assert o.metric("wsgateway.backplane.channels") == 1
        for n in range(3):
            redis_server.publish("ws:news", envelope("news", n))
        redis_server.publish("ws:news", b"not json")
        redis_server.publish("ws:news", envelope("sports", "wrong channel"))
        for ws in (a, b):
            assert [(await recv_json(ws))["data"] for _ in range(3)] == [0, 1, 2]
        # The replica's counters move on its own thread, just after the writes the clients
        # saw: wait for the last of them, then check every one exactly.
        await async_wait_until(
            lambda: (
                o.metric("wsgateway.messages.malformed") == 2
                and o.metric("wsgateway.delivery.latency") == 3
            )
        )
        assert o.metric("wsgateway.messages.received") == 5
        assert o.metric("wsgateway.deliveries") == 6
        assert o.metric("wsgateway.messages.malformed", reason="json") == 1
        assert o.metric("wsgateway.messages.malformed", reason="channel") == 1
        # One record per batch written (the three may coalesce), one latency per message.
        assert 1 <= o.metric("wsgateway.fanout.duration") <= 3
        assert o.metric("wsgateway.delivery.latency") == 3
    async with client(url) as flood:
        for n in range(40):
            await flood.send(json.dumps({"op": "ping", "id": n}))
        with pytest.raises(Exception):  # noqa: B017 - closed by the rate limit
            while True:
                await recv_json(flood)
    await async_wait_until(lambda: o.metric("wsgateway.connections.open") == 0)
    assert o.metric("wsgateway.connections.opened") == 3
    assert o.metric("wsgateway.connections.closed", **{"websocket.close.code": 1000}) == 2
    assert o.metric("wsgateway.connections.closed", reason="client") == 2
    assert (
        o.metric(
            "wsgateway.connections.closed", **{"websocket.close.code": 1008}, reason="rate_limit"
        )
        == 1
    )
    close_spans = o.finished("close")
    codes = [int(str((s.attributes or {})["websocket.close.code"])) for s in close_spans]
    assert sorted(codes) == [1000, 1000, 1008]


async def test_refused_handshakes_are_counted_and_traced(redis_server: RedisServer) -> None:
    o = Observed(redis_server, max_connections=1)
    try:
        async with client(o.replica.ws_url):
            with pytest.raises(InvalidStatus):
                async with client(o.replica.ws_url):
                    pass
        assert o.metric("wsgateway.handshakes.refused", reason="capacity") == 1
        [span] = o.finished("handshake")
        assert span.attributes is not None
        assert span.attributes["http.response.status_code"] == 503
    finally:
        o.replica.stop()


async def test_drops_are_counted_exactly(redis_server: RedisServer) -> None:
    o = Observed(
        redis_server,
        slow_consumer_policy="drop-newest",
        queue_max_messages=10,
        send_buffer=4096,
        write_limit=4096,
        stall_timeout=60,
    )
    stalled = RawClient(o.replica.ws_url + "?channels=feed", rcvbuf=4096)
    try:
        hub = o.replica.gateway.hub
        await async_wait_until(lambda: o.replica.call(lambda: hub.subscribers("feed")) == 1)
        pad = "x" * 4000
        count = 300
        for n in range(count):
            redis_server.publish("ws:feed", envelope("feed", {"n": n, "pad": pad}))
        await async_wait_until(lambda: o.metric("wsgateway.deliveries") == count)
        dropped = o.metric(
            "wsgateway.deliveries.dropped", policy="drop-newest", reason="queue_full"
        )
        assert dropped > 0
        assert o.metric("wsgateway.queue.deepest") == 10
        assert o.metric("wsgateway.queue.depth") > 0  # depths were recorded at enqueue
        # Read everything now: what arrives plus what was dropped is every message.
        frames = await asyncio.to_thread(stalled.read_frames, 3.0)
        texts = [bytes(f.data) for f in frames]
        received = [json.loads(t) for t in texts if t.startswith(b'{"op":"message"')]
        assert len(received) + dropped == count
    finally:
        stalled.close()
        o.replica.stop()


async def test_backplane_state_and_reconnects(redis_server: RedisServer) -> None:
    o = Observed(redis_server, reconnect_min=0.05, reconnect_max=0.2)
    try:
        assert o.metric("wsgateway.backplane.connected") == 1
        assert o.metric("wsgateway.backplane.reconnects") == 0
        redis_server.kill()
        await async_wait_until(lambda: o.metric("wsgateway.backplane.connected") == 0)
        await asyncio.sleep(0.5)
        redis_server.start()
        await async_wait_until(lambda: o.metric("wsgateway.backplane.connected") == 1, timeout=10)
        assert o.metric("wsgateway.backplane.reconnects") == 1
        assert o.metric("wsgateway.backplane.outage") >= 0.5
    finally:
        o.replica.stop()


async def test_prometheus_endpoint_serves_parseable_text(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url})
    async with client(gateway.ws_url + "?channels=news") as ws:
        await recv_json(ws)
        redis_server.publish("ws:news", envelope("news", 1))
        await recv_json(ws)
        assert (await request(ws, {"op": "ping"}))["op"] == "pong"
        status, text = gateway.http("/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["wsgateway_connections_open"].samples[0].value == 1
    assert families["wsgateway_deliveries"].samples[0].value == 1
    latency = families["wsgateway_delivery_latency_seconds"]
    buckets = {s.labels["le"] for s in latency.samples if s.name.endswith("_bucket")}
    assert {"5e-05", "0.001", "10.0", "+Inf"} <= buckets
    assert families["wsgateway_backplane_connected"].samples[0].value == 1


def test_metrics_endpoint_can_be_turned_off(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_METRICS": "off"})
    assert gateway.http("/metrics")[0] == 404


def test_logs_are_json_lines_with_trace_ids_inside_spans(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gateway = gateway_factory({"GATEWAY_LOG_FORMAT": "json"})
    gateway.stop()
    lines = gateway.logs().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys()
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    with tracer.start_as_current_span("work") as span:
        inside = json.loads(JsonFormatter().format(record))
    outside = json.loads(JsonFormatter().format(record))
    assert inside["message"] == "hello x"
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in outside


def test_text_logs_for_people(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_LOG_FORMAT": "text"})
    first = gateway.logs().splitlines()[0]
    assert " INFO gateway: " in first and not first.startswith("{")


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_otlp_export_of_traces_and_metrics(
    redis_server: RedisServer, gateway_factory: GatewayFactory, protocol: str
) -> None:
    collector = HttpCollector() if protocol == "http/protobuf" else GrpcCollector()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url, **otel})
        async with client(gateway.ws_url + "?channels=news") as ws:
            await recv_json(ws)
            result = wspublish("--redis-url", redis_server.url, "news", '{"n": 1}', env=otel)
            assert result.returncode == 0, result.stderr
            assert (await recv_json(ws))["data"] == {"n": 1}
        await async_wait_until(
            lambda: {"send news", "process news", "close"} <= collector.span_names(), timeout=15
        )
        await async_wait_until(
            lambda: (
                {"wsgateway.deliveries", "wsgateway.delivery.latency"} <= collector.metric_names
            ),
            timeout=15,
        )
        with collector.lock:
            spans = {span.name: span for span in collector.spans}
        # The gateway's CONSUMER span links to wspublish's PRODUCER span, across processes.
        [link] = spans["process news"].links
        assert (link.trace_id, link.span_id) == (
            spans["send news"].trace_id,
            spans["send news"].span_id,
        )
    finally:
        collector.stop()


async def test_keepalive_round_trips_are_recorded(redis_server: RedisServer) -> None:
    o = Observed(redis_server, ping_interval=0.2, ping_timeout=2)
    try:
        async with client(o.replica.ws_url):
            await async_wait_until(lambda: o.metric("wsgateway.keepalive.rtt") >= 2)
    finally:
        o.replica.stop()


@pytest.mark.parametrize(("sampler", "recording"), [("always_off", False), ("always_on", True)])
def test_sampling_follows_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, sampler: str, recording: bool
) -> None:
    collector = HttpCollector()  # an endpoint that answers, so shutdown's flush is quick
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    telemetry = Telemetry(prometheus=False)
    try:
        assert telemetry.tracer is not None
        with telemetry.tracer.start_as_current_span("x") as span:
            assert span.is_recording() is recording
    finally:
        telemetry.shutdown()
        collector.stop()


def test_no_exporter_means_no_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
    ):
        monkeypatch.delenv(name, raising=False)
    assert Telemetry(prometheus=False).tracer is None


async def test_the_loop_lag_is_what_a_blocked_loop_makes_a_timer_wait() -> None:
    samples: list[tuple[float, float, float]] = []
    watcher = asyncio.create_task(lag.watch(lambda *sample: samples.append(sample), 0.02))
    await asyncio.sleep(0.1)
    time.sleep(0.3)  # noqa: ASYNC251 - on purpose: a callback that keeps the loop 300 ms
    await asyncio.sleep(0.1)
    watcher.cancel()
    lags = [lag for lag, _, _ in samples]
    assert max(lags) >= 0.25  # the one due during the block ran that late
    assert sorted(lags)[len(lags) // 2] < 0.02  # the others, on time


async def spin(seconds: float) -> None:
    """Keep the loop busy for ``seconds``, letting its other tasks (the sampler) run."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:  # noqa: ASYNC110 - busy on purpose
        await asyncio.sleep(0)


def burn(seconds: float) -> None:
    """Run on the CPU until the calling thread has used ``seconds`` of it."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


@contextlib.contextmanager
def busy_neighbour(core: int) -> Iterator[None]:
    """A process spinning on CPU ``core`` for as long as the block lasts."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(neighbour.pid, {core})
        yield
    finally:
        neighbour.kill()
        neighbour.wait()


async def test_the_cpu_share_is_what_the_process_used_between_samples() -> None:
    samples: list[tuple[float, float, float]] = []
    watcher = asyncio.create_task(lag.watch(lambda *sample: samples.append(sample), 0.05))
    await asyncio.sleep(0.2)  # idle: the loop sleeps
    idle = len(samples)
    await spin(0.2)
    await asyncio.sleep(0.06)
    watcher.cancel()
    assert max(cpu for _, cpu, _ in samples[1:idle]) < 0.2
    assert max(cpu for _, cpu, _ in samples[idle:]) > 0.5


@pytest.mark.skipif(not Path(lag.SCHEDSTAT).exists(), reason="needs Linux's schedstat")
async def test_the_wait_share_is_the_time_a_shared_core_kept_the_loop_waiting() -> None:
    """The loop's thread pinned to one CPU beside a busy process pinned there too: busy, it
    gets about half the core and waits about the other half, which its CPU share alone does
    not show (it reads 0.5, like a replica at half load); idle, it waits for nothing."""
    before = os.sched_getaffinity(0)
    core = min(before)
    with busy_neighbour(core):
        os.sched_setaffinity(0, {core})  # this thread: the loop's
        try:
            samples: list[tuple[float, float, float]] = []
            watcher = asyncio.create_task(lag.watch(lambda *sample: samples.append(sample), 0.1))
            await asyncio.sleep(0.35)
            idle = len(samples)
            await spin(0.6)
            watcher.cancel()
        finally:
            os.sched_setaffinity(0, before)
    assert max(wait for _, _, wait in samples[:idle]) < 0.1
    busy = samples[idle + 1 : -1]  # whole intervals of spinning
    assert busy and all(cpu + wait > 0.9 for _, cpu, wait in busy), busy
    assert all(wait > 0.25 for _, _, wait in busy), busy


@pytest.mark.skipif(not Path(lag.SCHEDSTAT).exists(), reason="needs Linux's schedstat")
async def test_the_time_a_replicas_loop_waited_for_a_shared_core_is_a_metric(
    observed: Observed,
) -> None:
    """The replica's loop thread pinned to one CPU beside a busy process: while the loop runs
    it waits about as long as it runs, and ``wsgateway.loop.waited`` counts it, read from
    another thread (the metric reader's, here the test's), not that thread's own wait."""
    replica = observed.replica
    thread = replica.call(lambda: replica.gateway.loop_thread)
    assert thread is not None and thread != threading.get_native_id()
    core = min(os.sched_getaffinity(0))
    with busy_neighbour(core):
        os.sched_setaffinity(thread, {core})
        await asyncio.sleep(0.1)
        before = observed.metric("wsgateway.loop.waited")
        await asyncio.sleep(0.5)
        idle = observed.metric("wsgateway.loop.waited") - before
        replica.call(lambda: burn(0.3))  # the loop runs 0.3 s of CPU beside the neighbour
        busy = observed.metric("wsgateway.loop.waited") - before - idle
    assert idle < 0.05, idle
    assert busy > 0.15, busy


def test_a_stopped_replica_shows_its_loop_lag(gateway_factory: GatewayFactory) -> None:
    """SIGSTOP holds the whole process for 0.6 s, as a saturated core would: the histogram
    records it, for an alert on the replica's saturation."""
    gateway = gateway_factory()

    def slow_samples() -> float:
        _, text = gateway.http("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = families["wsgateway_loop_lag_seconds"].samples
        buckets = {s.labels.get("le"): s.value for s in samples if s.name.endswith("_bucket")}
        return buckets["+Inf"] - buckets["0.25"]

    time.sleep(0.3)  # a few samples first
    assert slow_samples() == 0
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGSTOP)
    time.sleep(0.6)
    gateway.process.send_signal(signal.SIGCONT)
    wait_until(lambda: slow_samples() >= 1)
