"""One client request's observability: its server span, its metrics, its reply chunks."""

from __future__ import annotations

import asyncio
import time

from opentelemetry import trace

from coordinator.metrics import CoordinatorMetrics
from edgefleet import telemetry
from edgefleet.errors import EdgefleetError
from edgefleet.v1 import common_pb2, coordinator_pb2


class RequestTracker:
    """One client request: its server span, its metrics, and the reply chunks.

    It turns the nodes' chunks into the client's (counting failovers as the
    serving node changes) and records time to first token, time per output
    token, token usage and the final status.
    """

    def __init__(self, method: str, metadata, metrics: CoordinatorMetrics | None, sampling):
        self._method = method
        self._metrics = metrics
        self._metadata = metadata  # the caller's request metadata or HTTP headers
        self._sampling = sampling
        self.model = ""
        self.status = "OK"
        self.failovers = 0
        self._node_id = ""
        self._started = time.perf_counter()
        self._first_token: float | None = None
        self.span = trace.INVALID_SPAN
        # The context to create this request's child spans in. The span is not
        # attached as "current": the handlers are async generators that may be
        # closed from another context, where an attached one cannot detach.
        self.context = None

    def __enter__(self) -> RequestTracker:
        self.span = telemetry.tracer().start_span(
            f"chat {self._method}",
            context=telemetry.incoming_context(self._metadata),
            kind=trace.SpanKind.SERVER,
        )
        self.context = trace.set_span_in_context(self.span)
        if self.span.is_recording():
            self.span.set_attribute("gen_ai.operation.name", "chat")
            self.span.set_attribute("rpc.method", self._method)
            if self._sampling.HasField("max_tokens"):
                self.span.set_attribute("gen_ai.request.max_tokens", self._sampling.max_tokens)
            if self._sampling.HasField("temperature"):
                self.span.set_attribute("gen_ai.request.temperature", self._sampling.temperature)
        return self

    def describe(self, model: str, session_id: str, policy: str) -> None:
        self.model = model
        if self.span.is_recording():
            self.span.update_name(f"chat {model}")
            self.span.set_attribute("gen_ai.request.model", model)
            self.span.set_attribute("edgefleet.placement.policy", policy)
            if session_id:
                self.span.set_attribute("edgefleet.session.id", session_id)

    def relay(self, chunk, session_id: str) -> coordinator_pb2.ChatChunk:
        if self._node_id and chunk.node_id and chunk.node_id != self._node_id:
            self.failovers += 1
        self._node_id = chunk.node_id or self._node_id
        if chunk.text and self._first_token is None:
            self._first_token = time.perf_counter()
            ttft = self._first_token - self._started
            if self._metrics is not None:
                self._metrics.time_to_first_token.labels(self.model).observe(ttft)
            if self.span.is_recording():
                self.span.set_attribute("edgefleet.time_to_first_token_ms", ttft * 1000)
        reply = coordinator_pb2.ChatChunk(
            text=chunk.text,
            node_id=self._node_id,
            session_id=session_id,
            failovers=self.failovers,
            token_count=chunk.token_count,
        )
        if chunk.finish_reason:
            reply.finish_reason = chunk.finish_reason
            reply.usage.CopyFrom(chunk.usage)
            reply.model = self.model
            self._finished(chunk)
        return reply

    def _finished(self, chunk) -> None:
        usage = chunk.usage
        if self._metrics is not None:
            self._metrics.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)
            self._metrics.generation_tokens.labels(self.model).inc(usage.completion_tokens)
            if self._first_token is not None and usage.completion_tokens > 1:
                self._metrics.time_per_output_token.labels(self.model).observe(
                    (time.perf_counter() - self._first_token) / (usage.completion_tokens - 1)
                )
        if self.span.is_recording():
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                    "gen_ai.response.finish_reasons": [
                        common_pb2.FinishReason.Name(chunk.finish_reason)
                        .removeprefix("FINISH_REASON_")
                        .lower()
                    ],
                    "edgefleet.node.id": self._node_id,
                    "edgefleet.failovers": self.failovers,
                }
            )

    def failed(self, error: EdgefleetError) -> None:
        self.status = error.code.name
        self.span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.status == "OK":
            self.status = "CANCELLED" if exc_type is asyncio.CancelledError else "INTERNAL"
        if self._metrics is not None:
            self._metrics.requests.labels(self._method, self.status).inc()
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self.span.record_exception(exc)
        self.span.end()
        return False
