"""Tracing set-up and W3C trace-context propagation over gRPC, for both daemons.

Exporters are chosen by the standard OpenTelemetry environment variables:

    OTEL_TRACES_EXPORTER   none (default) | otlp | console | discard
    OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL  grpc | http/protobuf
    OTEL_RESOURCE_ATTRIBUTES, OTEL_SDK_DISABLED, OTEL_BSP_*

``otlp`` is also chosen when only an OTLP endpoint is set. ``discard``
records spans and drops them (to measure what recording costs). With
``none`` no SDK is installed: every span is the API's non-recording span, and
code guards attribute work behind ``span.is_recording()``, so tracing costs
nothing measurable. Prompt and reply text are recorded only with
``EDGEFLEET_TRACE_CONTENT=true``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

TRACER_NAME = "edgefleet"


def _exporter_name() -> str:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "none"
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name:
        return name
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return "otlp" if endpoint else "none"


def setup_tracing(service_name: str, instance_id: str = "") -> bool:
    """Install the SDK tracer provider the environment asks for; True if tracing is on."""
    exporter_name = _exporter_name()
    if exporter_name == "none":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create(
        {
            "service.name": service_name,
            "service.instance.id": instance_id or f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)
    if exporter_name == "otlp":
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    elif exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name == "discard":
        provider.add_span_processor(BatchSpanProcessor(_DiscardExporter()))
    else:
        log.warning("unknown OTEL_TRACES_EXPORTER %r: tracing stays off", exporter_name)
        return False
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s exporter, service %s", exporter_name, service_name)
    return True


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()  # flushes what is still batched


def _otlp_exporter():
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class _DiscardExporter:
    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def record_content() -> bool:
    return os.environ.get("EDGEFLEET_TRACE_CONTENT", "").lower() in ("1", "true", "yes")


# --- propagation over gRPC metadata ------------------------------------------------------


def outgoing_metadata(span: trace.Span | None = None) -> tuple[tuple[str, str], ...]:
    """The trace context (of ``span``, else the current one) as gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span else None)
    return tuple(carrier.items())


def incoming_context(metadata: Sequence[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The caller's trace context from gRPC (or HTTP) metadata."""
    carrier: Mapping[str, str] = {
        key.lower(): value.decode() if isinstance(value, bytes) else value
        for key, value in (metadata or ())
    }
    return propagate.extract(carrier)
