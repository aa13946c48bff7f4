"""NodeService over gRPC: generation, model management, capacity, drain.

The servicer only translates: requests to ``Node`` calls, events to chunks,
errors to statuses with their named reasons; spans and metrics are recorded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from opentelemetry import trace

from edgefleet import telemetry
from edgefleet.errors import EdgefleetError, Reason, abort_with, error_of
from edgefleet.generation import QUEUED_METADATA_KEY
from edgefleet.model_store import read_chunks
from edgefleet.v1 import common_pb2, models_pb2, node_pb2, node_pb2_grpc
from node_agent.metrics import NodeMetrics
from node_agent.models import DEFAULT as DEFAULT_KEEP_ALIVE
from node_agent.node import Admitted, Node, Queued, loaded_model
from node_agent.runtime.base import Finish, FinishReason

log = logging.getLogger(__name__)
# Peers a LoadModel may name to fetch a file from (coordinators name up to 3).
MAX_PEERS = 8

SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CONTEXT_FULL: common_pb2.FINISH_REASON_CONTEXT_FULL,
    FinishReason.TOOL_CALLS: common_pb2.FINISH_REASON_TOOL_CALLS,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}


# Status details travel in a trailer, and a peer refuses trailers over its
# metadata limit (8 KiB by default), which would turn a named refusal into a
# bare transport error. Messages may quote input, so they are cut short.
MAX_MESSAGE_CHARS = 1024


def bounded(error: EdgefleetError) -> EdgefleetError:
    """``error`` with its message cut to MAX_MESSAGE_CHARS (same reason, same code)."""
    if len(error.message) <= MAX_MESSAGE_CHARS:
        return error
    return error_of(
        error.reason,
        error.message[:MAX_MESSAGE_CHARS] + "...",
        retry_after_s=error.retry_after_s,
    )


def finish_reason_name(reason: int) -> str:
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def request_attributes(request: node_pb2.GenerateRequest, node_id: str) -> dict:
    """OpenTelemetry GenAI attributes of a generation request."""
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": request.model,
        "edgefleet.node.id": node_id,
    }
    if request.session_id:
        attributes["edgefleet.session.id"] = request.session_id
    sampling = request.sampling
    if sampling.HasField("max_tokens"):
        attributes["gen_ai.request.max_tokens"] = sampling.max_tokens
    if sampling.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = sampling.temperature
    if sampling.HasField("top_p"):
        attributes["gen_ai.request.top_p"] = sampling.top_p
    if sampling.HasField("seed"):
        attributes["gen_ai.request.seed"] = sampling.seed
    if request.assistant_prefix:
        attributes["edgefleet.continuation.prefix_chars"] = len(request.assistant_prefix)
    if telemetry.record_content():
        attributes["edgefleet.prompt"] = "\n".join(
            f"{m.role}: {m.content}" for m in request.messages
        )
    return attributes


def _child_span(
    parent, name: str, start_ns: int, end_ns: int, attributes: dict | None = None
) -> None:
    """A finished child span of ``parent`` (a context), with measured start and end."""
    span = telemetry.tracer().start_span(
        name, context=parent, start_time=start_ns, attributes=attributes
    )
    span.end(end_time=max(start_ns, end_ns))


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    """NodeService over gRPC: a thin adapter over ``Node`` (spans, chunks, statuses)."""

    def __init__(self, node: Node, *, metrics: NodeMetrics | None = None) -> None:
        self._node = node
        self._metrics = metrics

    # --- generation ----------------------------------------------------------
    async def Generate(self, request: node_pb2.GenerateRequest, context):
        request_id = request.request_id or uuid.uuid4().hex
        arrived_ns = time.time_ns()
        status = "OK"
        # The span is never attached as "current": this handler is an async
        # generator that grpc may close from another context when the caller
        # cancels, and a context attached here could not be detached there.
        # Children and log lines name it explicitly.
        span = telemetry.tracer().start_span(
            f"chat {request.model}",
            context=telemetry.incoming_context(context.invocation_metadata()),
            kind=trace.SpanKind.SERVER,
        )
        in_span = trace.set_span_in_context(span)
        try:
            if span.is_recording():
                span.set_attributes(request_attributes(request, self._node.node_id))
            try:
                async with contextlib.aclosing(self._node.generate(request)) as events:
                    async for chunk in self._chunks(events, span, in_span, arrived_ns, context):
                        yield chunk
            except EdgefleetError as error:
                status = error.code.name
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                with trace.use_span(span):  # the log line carries the trace id
                    log.info(
                        "generate %s refused: %s %s", request_id, error.reason.name, error.message
                    )
                await abort_with(context, bounded(error))
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except Exception as exc:
                # A bug, not a request's fault (those are EdgefleetErrors with their
                # reasons, preparation included): a named INTERNAL, so that the
                # coordinator fails over and suspects this node, rather than a bare
                # UNKNOWN, which means "not an edgefleet node" and quarantines it.
                status = "INTERNAL"
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                with trace.use_span(span):
                    log.exception("generate %s failed", request_id)
                await abort_with(
                    context,
                    error_of(Reason.INTERNAL, f"the node failed: {type(exc).__name__}"),
                )
            finally:
                if self._metrics is not None:
                    self._metrics.requests.labels(request.model, status).inc()
        finally:
            span.end()

    async def _chunks(self, events, span, in_span, arrived_ns: int, context):
        """The node's events as GenerateChunks: an empty first chunk when a slot
        is held, text chunks with their token counts, one final chunk. A queued
        request gets its queue position as initial metadata first."""
        node_id = self._node.node_id
        seq = 0
        pending_tokens = 0
        admitted: Admitted | None = None
        async for event in events:
            if isinstance(event, Queued):
                # Headers go out now: the caller learns it waits, not stalls.
                await context.send_initial_metadata(((QUEUED_METADATA_KEY, str(event.position)),))
                continue
            if isinstance(event, Admitted):
                admitted = event
                if span.is_recording():
                    _child_span(in_span, "queue", arrived_ns, event.admitted_ns)
                # First message: the request holds a slot and generation starts.
                yield node_pb2.GenerateChunk(seq=seq, node_id=node_id)
                continue
            seq += 1
            if isinstance(event, Finish):
                chunk = node_pb2.GenerateChunk(
                    seq=seq,
                    token_count=pending_tokens,
                    finish_reason=FINISH_REASONS[event.reason],
                    usage=common_pb2.Usage(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        cached_prompt_tokens=event.cached_prompt_tokens,
                    ),
                    timings=common_pb2.Timings(
                        queue_ms=admitted.queue_ms,
                        prompt_ms=event.prompt_ms,
                        generation_ms=event.generation_ms,
                        time_to_first_token_ms=admitted.queue_ms + event.time_to_first_token_ms,
                    ),
                    node_id=node_id,
                )
                self._record_finish(span, in_span, admitted.model, chunk, admitted.admitted_ns)
                yield chunk
                return
            pending_tokens += event.tokens
            if not event.text:  # held back (stop-string prefix, split character)
                seq -= 1
                continue
            yield node_pb2.GenerateChunk(
                seq=seq, text=event.text, token_count=pending_tokens, node_id=node_id
            )
            pending_tokens = 0

    def _record_finish(self, span, in_span, model: str, chunk, admitted_ns: int) -> None:
        usage, timings = chunk.usage, chunk.timings
        if self._metrics is not None:
            self._metrics.time_to_first_token.labels(model).observe(
                timings.time_to_first_token_ms / 1000
            )
            if usage.completion_tokens > 1:
                self._metrics.time_per_output_token.labels(model).observe(
                    timings.generation_ms / 1000 / (usage.completion_tokens - 1)
                )
            self._metrics.prompt_tokens.labels(model).inc(usage.prompt_tokens)
            self._metrics.generation_tokens.labels(model).inc(usage.completion_tokens)
        if span.is_recording():
            first_token_ns = admitted_ns + int(timings.prompt_ms * 1e6)
            _child_span(
                in_span,
                "prompt_processing",
                admitted_ns,
                first_token_ns,
                {
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "edgefleet.usage.cached_input_tokens": usage.cached_prompt_tokens,
                },
            )
            _child_span(
                in_span,
                "generation",
                first_token_ns,
                first_token_ns + int(timings.generation_ms * 1e6),
                {"gen_ai.usage.output_tokens": usage.completion_tokens},
            )
            span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                    "gen_ai.response.finish_reasons": [finish_reason_name(chunk.finish_reason)],
                    "edgefleet.time_to_first_token_ms": timings.time_to_first_token_ms,
                }
            )

    # --- models --------------------------------------------------------------
    async def LoadModel(self, request: node_pb2.LoadModelRequest, context):
        try:
            model = await self._node.load_model(
                request.model,
                slots=request.slots,
                context_length=request.context_length,
                source=request.source if request.HasField("source") else None,
                keep_alive_s=keep_alive_of(request.keep_alive_s),
                peers=list(request.peers)[:MAX_PEERS],
            )
            return loaded_model(model)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def UnloadModel(self, request: node_pb2.UnloadModelRequest, context):
        try:
            await self._node.unload_model(request.model)
            return node_pb2.UnloadModelResponse()
        except EdgefleetError as error:
            await abort_with(context, error)

    async def ListModels(self, request: node_pb2.ListModelsRequest, context):
        return node_pb2.ListModelsResponse(
            loaded=[loaded_model(model) for model in self._node.models.hosted()],
            catalog=self._node.catalog(),
        )

    async def FetchModel(self, request: models_pb2.FetchModelRequest, context):
        """A model file for a peer node (sha256 named; checked again by the peer)."""
        try:
            path, size = self._node.shared_file(request.alias, request.sha256, request.offset)
        except EdgefleetError as error:
            await abort_with(context, error)
            return
        async with self._node.sending(request.alias, context.peer()) as admitted:
            if not admitted:
                await abort_with(
                    context,
                    error_of(
                        Reason.UPLOADS_BUSY,
                        "this node is sending as many model files as it may; ask another",
                    ),
                )
                return
            try:
                async for data in read_chunks(path, request.offset):
                    yield models_pb2.FetchModelChunk(data=data, size_bytes=size)
            except EdgefleetError as error:  # the file went away meanwhile
                await abort_with(context, error)

    # --- capacity and drain ----------------------------------------------------
    async def GetCapacity(self, request: node_pb2.GetCapacityRequest, context):
        return self._node.capacity()

    async def Drain(self, request: node_pb2.DrainRequest, context):
        await self._node.set_draining(request.drain)
        return node_pb2.DrainResponse(
            draining=self._node.draining, active_generations=self._node.active_generations
        )


def keep_alive_of(seconds: float):
    """LoadModelRequest.keep_alive_s: 0 = the node's default, < 0 = never unloaded."""
    if seconds == 0 or seconds != seconds:  # 0 or NaN: the default
        return DEFAULT_KEEP_ALIVE
    return None if seconds < 0 else seconds
