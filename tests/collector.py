"""A minimal OTLP receiver (HTTP/protobuf and gRPC): what a collector would get.

Tests start it in-process on loopback. The system test runs this very file in a container
where no OpenTelemetry collector image can be had (``python collector.py``: gRPC on 4317,
HTTP on 4318), and reads what it received as JSON from ``GET /received`` on 4318. It needs
only grpcio and opentelemetry-proto, which the gateway image has.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Received:
    """Span and metric names received, and the spans themselves, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[Any] = []
        self.services: list[str] = []  # service.name of each span, by index
        self.metric_names: set[str] = set()

    def traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes
                     if a.key == "service.name"),
                    "",
                )  # fmt: skip
                for scope in resource.scope_spans:
                    self.spans.extend(scope.spans)
                    self.services.extend([service] * len(scope.spans))

    def metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    self.metric_names.update(m.name for m in scope.metrics)

    def span_names(self) -> set[str]:
        with self.lock:
            return {span.name for span in self.spans}

    def summary(self) -> dict[str, Any]:
        """What was received, as JSON can carry it: each span's service, name, ids (hex) and
        the trace ids it links to; the metric names."""
        with self.lock:
            spans = [
                {
                    "service": service,
                    "name": span.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "links": [link.trace_id.hex() for link in span.links],
                }
                for service, span in zip(self.services, self.spans, strict=True)
            ]
            return {"spans": spans, "metrics": sorted(self.metric_names)}


class HttpCollector(Received):
    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, into: Received | None = None
    ) -> None:
        """``into``: record there instead (to serve what another receiver got)."""
        super().__init__()
        received = into or self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/received":
                    self.send_error(404)
                    return
                payload = json.dumps(received.summary()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    received.traces(request)
                    reply = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    request = metrics_service_pb2.ExportMetricsServiceRequest()
                    request.ParseFromString(body)
                    received.metrics(request)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                payload = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcCollector(Received):
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        received = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                received.traces(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                received.metrics(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


def main() -> None:
    """Both receivers on every interface, sharing what they receive; runs until killed."""
    grpc_side = GrpcCollector("0.0.0.0", 4317)
    HttpCollector("0.0.0.0", 4318, into=grpc_side)
    print("OTLP receiver: gRPC on 4317, HTTP on 4318 (GET /received)", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
