"""OpenTelemetry metrics and traces of a replica.

Counters live in :class:`~gateway.stats.Stats` as plain integers bumped in bulk; the instruments
here are observable ones that read them when a reader collects, so the fan-out path makes no
metric call per delivery. Histograms are recorded once per message (fan-out duration, delivery
latency of uncongested clients), per queued delivery (congested clients only) and per pong.

Exporters are configured the standard way: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``) turns on OTLP, ``OTEL_EXPORTER_OTLP_PROTOCOL``
picks ``grpc`` (default) or ``http/protobuf``, ``OTEL_{TRACES,METRICS}_EXPORTER=none`` turns a
signal off, ``OTEL_TRACES_SAMPLER``/``_ARG`` set sampling, ``OTEL_SERVICE_NAME`` the service.
``GATEWAY_METRICS=off`` removes the Prometheus ``/metrics`` endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import Link, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

import gateway
from gateway import lag
from publisher import otlp

if TYPE_CHECKING:
    from gateway.envelope import Envelope
    from gateway.server import Gateway

__all__ = ["LATENCY_BUCKETS", "Telemetry"]

#: Seconds, 50 microseconds to 10 seconds (the SDK's defaults assume milliseconds).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
QUEUE_DEPTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

_propagator = TraceContextTextMapPropagator()

#: An observable instrument's callback.
Reading = Callable[[CallbackOptions], Iterable[Observation]]


def one(value: Callable[[], float]) -> Reading:
    """One unlabelled value."""
    return lambda options: [Observation(value())]


def by(counts: Callable[[], dict[Any, int]], *names: str) -> Reading:
    """One value per key of a Counter; the key's parts become the attributes ``names``."""

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        for key, value in list(counts().items()):
            parts = key if isinstance(key, tuple) else (key,)
            yield Observation(value, dict(zip(names, parts, strict=True)))

    return observe


def loop_waited(replica: Gateway) -> float:
    """Seconds the thread running the replica's loop has waited for a CPU, in all (0 until the
    replica starts)."""
    thread = replica.loop_thread
    return 0.0 if thread is None else lag.waited(thread)


class Telemetry:
    """The replica's meter, tracer and Prometheus registry.

    Tests inject their own providers (with in-memory readers and exporters); otherwise they
    are built from the environment. ``tracer`` is None when no trace exporter is configured:
    the message path then does no tracing work at all.
    """

    def __init__(
        self,
        *,
        prometheus: bool,
        meter_provider: MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", "wsgateway"),
                "service.version": gateway.__version__,
            }
        )
        self.registry: CollectorRegistry | None = None
        self._owned: list[Any] = []  # providers built here, shut down here
        if meter_provider is None:
            readers: list[MetricReader] = []
            if prometheus:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader

                self.registry = CollectorRegistry()
                readers.append(PrometheusMetricReader(registry=self.registry))
            if otlp.exporter_wanted("metrics"):
                readers.append(otlp.metric_reader())
            meter_provider = SdkMeterProvider(resource=resource, metric_readers=readers)
            self._owned.append(meter_provider)
        if tracer_provider is None and otlp.exporter_wanted("traces"):
            tracer_provider = otlp.tracer_provider(resource)
            self._owned.append(tracer_provider)
        self.tracer: Tracer | None = (
            tracer_provider.get_tracer("wsgateway", gateway.__version__)
            if tracer_provider is not None
            else None
        )
        meter = meter_provider.get_meter("wsgateway", gateway.__version__)
        self.meter = meter
        self.fanout_duration = meter.create_histogram(
            "wsgateway.fanout.duration",
            unit="s",
            description="time to hand one batch of a channel's messages (one, or several that "
            "arrived together) to every local subscriber",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )
        self.delivery_latency = meter.create_histogram(
            "wsgateway.delivery.latency",
            unit="s",
            description="publish time (envelope ts, millisecond resolution) to the frame being "
            "handed to the client's socket",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )
        self.queue_depth = meter.create_histogram(
            "wsgateway.queue.depth",
            unit="{message}",
            description="depth of a client's queue when a message is queued (congested clients)",
            explicit_bucket_boundaries_advisory=list(QUEUE_DEPTH_BUCKETS),
        )
        self.loop_lag = meter.create_histogram(
            "wsgateway.loop.lag",
            unit="s",
            description="how much later than due the event loop ran a timer, sampled ten times "
            "a second: what every client of the replica waits at that moment (saturation)",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )
        self.keepalive_rtt = meter.create_histogram(
            "wsgateway.keepalive.rtt",
            unit="s",
            description="round-trip time of keepalive ping/pong",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )

    def observe(self, replica: Gateway) -> None:
        """Register the observable instruments that read ``replica``'s counters."""
        stats = replica.stats
        backplane = replica.hub.backplane
        sessions = replica.sessions
        admission = replica.admission
        counter = self.meter.create_observable_counter
        up_down = self.meter.create_observable_up_down_counter
        gauge = self.meter.create_observable_gauge
        instruments: list[tuple[Callable[..., Any], str, Reading, str, str]] = [
            (up_down, "connections.open", one(lambda: stats.connections_open), "{connection}",
             "open client connections"),
            (counter, "connections.opened", one(lambda: stats.connections_opened),
             "{connection}", "client connections accepted"),
            (counter, "connections.closed",
             by(lambda: stats.closes, "websocket.close.code", "reason"), "{connection}",
             "client connections closed, by close code and reason (client, slow_consumer, "
             "drain, rate_limit, auth, control, protocol, limit, error)"),
            (counter, "handshakes.refused", by(lambda: stats.refused, "reason"), "{handshake}",
             "sockets and handshakes refused, by reason (capacity, auth, user_limit, "
             "descriptors, handshakes, headers, malformed)"),
            (up_down, "handshakes.open", one(lambda: admission.handshakes), "{handshake}",
             "sockets still in their opening handshake"),
            (up_down, "sockets.open", one(lambda: admission.sockets), "{socket}",
             "client sockets held, handshakes included"),
            (counter, "messages.received", one(lambda: stats.messages_received), "{message}",
             "messages received from the backplane"),
            (counter, "messages.malformed", by(lambda: stats.malformed, "reason"), "{message}",
             "malformed envelopes dropped, by reason"),
            (counter, "messages.shed", one(lambda: stats.shed), "{message}",
             "messages from the backplane dropped unread because fan-out could not keep up: "
             "the oldest of the busiest channels"),
            (counter, "token.refreshes", by(lambda: stats.refreshes, "result"), "{refresh}",
             "in-band token refreshes, by result: ok, refused"),
            (counter, "control.requests", by(lambda: stats.control, "op", "result"),
             "{request}", "control requests from services, by op and result: ok, malformed, "
             "dropped (op '-' for the last two)"),
            (counter, "presence.members", by(lambda: stats.presence, "event"), "{member}",
             "presence members written, by event: join, leave, reaped (a dead replica's, "
             "sent by this one)"),
            (counter, "presence.events", by(lambda: stats.presence_events, "event"), "{event}",
             "join and leave frames sent to channels (each lists up to 100 members)"),
            (counter, "control.connections", by(lambda: stats.control_connections, "op"),
             "{connection}", "connections control requests acted on, by op"),
            (counter, "history", by(lambda: stats.history, "event"), "{message}",
             "history channel messages, by event: replayed, latest (a state channel's, to a "
             "subscriber), filled, duplicate, lost, unnumbered"),
            (counter, "kinds.mismatches", one(lambda: stats.kinds_mismatches), "{write}",
             "times this replica found other history channels written in Redis by another "
             "replica than its own (replicas configured differently)"),
            (counter, "deliveries", one(lambda: stats.fanout), "{delivery}",
             "messages handed to clients (written or queued)"),
            (counter, "writes", one(lambda: stats.writes), "{write}",
             "writes to client sockets; one write carries several messages when they coalesce"),
            (counter, "deliveries.dropped", by(lambda: stats.drops, "policy", "reason"),
             "{delivery}", "deliveries dropped, by policy and reason"),
            (gauge, "queue.deepest", one(lambda: max((s.queued for s in list(sessions)),
                                                     default=0)),
             "{message}", "the deepest client queue on the replica"),
            (gauge, "queue.bytes", one(lambda: sum(s.outbox.bytes for s in list(sessions)
                                                   if s.outbox is not None)),
             "By", "bytes queued for all clients of the replica"),
            (gauge, "coalescing.window", one(lambda: replica.hub.coalescing.window), "s",
             "how long a channel's messages may wait after its last write to go out together, "
             "now: 0 while the replica has CPU to spare (adaptive), the fixed window (window)"),
            (counter, "loop.waited", one(lambda: loop_waited(replica)), "s",
             "time the replica's event loop was ready to run and waited for a CPU: its rate is "
             "the share of the time a busy neighbour on its core (or a CPU limit) kept it "
             "waiting, which tells a shared core from too much load when loop.lag rises"),
            (gauge, "backplane.connected", one(lambda: int(backplane.connected)), "1",
             "1 while the backplane is connected"),
            (gauge, "backplane.node.connected",
             by(lambda: {n: int(ok) for n, ok in backplane.node_states().items()}, "node"),
             "1", "each Redis node connection: 1 while connected (one per primary on a cluster)"),
            (counter, "backplane.reconnects", one(lambda: backplane.reconnects), "{reconnect}",
             "backplane connections re-established after a loss"),
            (up_down, "backplane.channels",
             one(lambda: backplane.subscribed_channels - len(replica.hub.listeners)),
             "{channel}", "channels the backplane is subscribed to for clients (the replica's "
             "own control channel not counted)"),
            (counter, "backplane.outage", one(lambda: backplane.outage_seconds), "s",
             "total time the backplane was disconnected"),
        ]  # fmt: skip
        for create, name, reading, unit, description in instruments:
            create("wsgateway." + name, [reading], unit=unit, description=description)

    def consume(self, envelope: Envelope, start_time: int | None = None) -> Span:
        """A CONSUMER span ``process <channel>`` linked to the publisher's span, if any.

        ``start_time`` (ns since the epoch) is when the message arrived; the caller ends the
        span once the message has been handed to every subscriber.
        """
        assert self.tracer is not None
        return self.tracer.start_span(
            f"process {envelope.channel}",
            kind=SpanKind.CONSUMER,
            links=links_to(envelope.traceparent, envelope.tracestate),
            start_time=start_time,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": envelope.channel,
                "messaging.message.id": envelope.mid,
            },
        )

    def control(
        self, op: str, user: str, traceparent: str | None, tracestate: str | None
    ) -> Span | None:
        """A CONSUMER span ``control <op>`` linked to the service's span, if tracing is on."""
        if self.tracer is None:
            return None
        return self.tracer.start_span(
            f"control {op}",
            kind=SpanKind.CONSUMER,
            links=links_to(traceparent, tracestate),
            attributes={"wsgateway.control.op": op, "enduser.id": user},
        )

    @staticmethod
    def active(span: Span) -> AbstractContextManager[Span]:
        """Make ``span`` the current one (for log correlation) without ending it on exit."""
        return trace.use_span(span, end_on_exit=False)

    def shutdown(self) -> None:
        for provider in self._owned:
            provider.shutdown()


def links_to(traceparent: str | None, tracestate: str | None) -> list[Link]:
    """A link to the span whose context a publisher sent, if it sent a valid one."""
    if traceparent is None:
        return []
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    context = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
    return [Link(context)] if context.is_valid else []
