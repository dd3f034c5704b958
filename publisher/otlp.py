"""OTLP exporters from the standard ``OTEL_*`` variables, for the gateway and ``wspublish``.

``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._TRACES_ENDPOINT``/``..._METRICS_ENDPOINT``)
turns a signal on, ``OTEL_{TRACES,METRICS}_EXPORTER=none`` turns it off,
``OTEL_EXPORTER_OTLP_PROTOCOL`` picks ``grpc`` (default) or ``http/protobuf``.
"""

from __future__ import annotations

import os

from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = ["exporter_wanted", "metric_reader", "tracer_provider", "tracing_from_env"]


def exporter_wanted(signal: str) -> bool:
    """Whether OTLP export of ``signal`` (``traces`` or ``metrics``) is configured."""
    choice = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if choice:
        return choice == "otlp"
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def _http() -> bool:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip()
    return protocol in ("http/protobuf", "http")


def metric_reader() -> MetricReader:
    if _http():
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
    return PeriodicExportingMetricReader(OTLPMetricExporter())


def tracer_provider(resource: Resource) -> TracerProvider:
    """A provider exporting over OTLP in batches; its sampler comes from OTEL_TRACES_SAMPLER."""
    if _http():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracing_from_env(service: str) -> TracerProvider | None:
    """An OTLP tracer provider for a publishing program, or None when none is configured."""
    if not exporter_wanted("traces"):
        return None
    name = os.environ.get("OTEL_SERVICE_NAME", service)
    return tracer_provider(Resource.create({"service.name": name}))
