"""A minimal OTLP/gRPC trace receiver, for ``edgefleet traces`` and the tests.

It accepts what the daemons' OTLP exporters send and keeps the spans in
memory, so a newcomer (or a test) can see a whole trace without installing a
collector or Jaeger.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    events: list[tuple[str, dict]]
    status_code: int
    status_message: str
    children: list[ReceivedSpan] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(items) -> dict:
    return {item.key: _value(item.value) for item in items}


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, address: str = "127.0.0.1:0") -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        host = address.rsplit(":", 1)[0]
        self.port = self._server.add_insecure_port(address)
        self.endpoint = f"http://{host}:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)

    def exporter_env(self) -> dict[str, str]:
        """Environment for a daemon to export its spans here, promptly."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            service=resource.get("service.name", ""),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in span.events],
                            status_code=span.status.code,
                            status_message=span.status.message,
                        )
                    )
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, predicate, timeout_s: float = 30.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                found = predicate(list(self.spans))
            if found:
                return found
            time.sleep(0.05)
        return None


def span_tree(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """Link spans to their parents; returns the roots, children ordered by start."""
    by_id = {span.span_id: span for span in spans}
    for span in spans:
        span.children = []
    roots = []
    for span in sorted(spans, key=lambda s: s.start_ns):
        parent = by_id.get(span.parent_id)
        (parent.children if parent else roots).append(span)
    return roots


def render_tree(roots: list[ReceivedSpan], keys: tuple[str, ...] = ()) -> str:
    lines: list[str] = []

    def walk(span: ReceivedSpan, depth: int) -> None:
        shown = {k: span.attributes[k] for k in keys if k in span.attributes}
        extra = " ".join(f"{k}={v}" for k, v in shown.items())
        status = " ERROR: " + span.status_message if span.status_code == 2 else ""
        lines.append(
            f"{'  ' * depth}{span.name}  [{span.service}] {span.duration_ms:.1f} ms"
            f"{(' ' + extra) if extra else ''}{status}"
        )
        for name, attributes in span.events:
            detail = " ".join(f"{k}={v}" for k, v in attributes.items())
            lines.append(f"{'  ' * (depth + 1)}* event {name} {detail}")
        for child in span.children:
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)
