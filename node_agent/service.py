"""NodeService over gRPC: generation, model management, capacity, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from grpc_health.v1 import health
from opentelemetry import trace

from edgefleet import serving, telemetry
from edgefleet.errors import EdgefleetError, Unavailable, abort_with
from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc
from node_agent.capacity import GpuProbe, HostProbe, ThroughputMeter
from node_agent.catalog import CATALOG
from node_agent.metrics import NodeMetrics
from node_agent.models import HostedModel, ModelManager
from node_agent.requests import generation_request_from_proto
from node_agent.runtime.base import Finish, FinishReason
from node_agent.runtime.simulated import NAME as SIMULATED

log = logging.getLogger(__name__)

SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CONTEXT_FULL: common_pb2.FINISH_REASON_CONTEXT_FULL,
    FinishReason.TOOL_CALLS: common_pb2.FINISH_REASON_TOOL_CALLS,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}


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


# Reusing a slot's cache pays off for a conversation's history. For a short
# shared prefix (the chat template's system prompt) it does not: measured with
# 8 streams of short prompts, pinning each prompt to its slot cost about 15%
# of the aggregate throughput (bench node-concurrency), for reasons not yet
# understood; those take the least recently used slot instead.
MIN_REUSE_TOKENS = 64


def _worth_reusing(cached_tokens: int) -> int:
    return cached_tokens if cached_tokens >= MIN_REUSE_TOKENS else 0


def _child_span(
    parent, name: str, start_ns: int, end_ns: int, attributes: dict | None = None
) -> None:
    """A finished child span of ``parent`` (a context), with measured start and end."""
    span = telemetry.tracer().start_span(
        name, context=parent, start_time=start_ns, attributes=attributes
    )
    span.end(end_time=max(start_ns, end_ns))


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(
        self,
        *,
        node_id: str,
        models: ModelManager,
        host: HostProbe,
        gpus: GpuProbe,
        throughput: ThroughputMeter,
        health_servicer: health.aio.HealthServicer,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.node_id = node_id
        self._models = models
        self._host = host
        self._gpus = gpus
        self._throughput = throughput
        self._health = health_servicer
        self._metrics = metrics
        self._draining = False
        self._active = 0
        # Set when slots are taken or given back, so a fresh report can go out
        # at once instead of at the next heartbeat tick.
        self.capacity_changed = asyncio.Event()

    # --- state -------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active_generations(self) -> int:
        return self._active

    async def set_serving(self, on: bool) -> None:
        await serving.set_serving(self._health, SERVICE_NAME, on)

    async def set_draining(self, draining: bool) -> None:
        self._draining = draining
        await self.set_serving(not draining and bool(self._models.hosted()))

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
                span.set_attributes(request_attributes(request, self.node_id))
            try:
                if self._draining:
                    raise Unavailable("node is draining and takes no new generations")
                model = self._models.get(request.model)
                prepared = model.instance.prepare(generation_request_from_proto(request))
                # A continued reply (its start was sent by a node that failed)
                # has a user waiting mid-sentence: it goes to the head of the queue.
                # Among free slots, one already holding much of this prompt (a
                # conversation's history); otherwise the least recently used.
                async with model.pool.acquire(
                    first_in_line=bool(request.assistant_prefix),
                    prefer=lambda slot: _worth_reusing(
                        model.instance.cached_prefix(slot, prepared)
                    ),
                ) as slot:
                    admitted_ns = time.time_ns()
                    if span.is_recording():
                        _child_span(in_span, "queue", arrived_ns, admitted_ns)
                    self._active += 1
                    self.capacity_changed.set()
                    try:
                        async for chunk in self._stream(
                            model, slot, prepared, (admitted_ns - arrived_ns) / 1e6
                        ):
                            if chunk.finish_reason:
                                self._record_finish(span, in_span, model.name, chunk, admitted_ns)
                            yield chunk
                    finally:
                        self._active -= 1
                        self.capacity_changed.set()
            except EdgefleetError as error:
                status = error.code.name
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                with trace.use_span(span):  # the log line carries the trace id
                    log.info("generate %s refused: %s %s", request_id, status, error.message)
                await abort_with(context, error)
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            finally:
                if self._metrics is not None:
                    self._metrics.requests.labels(request.model, status).inc()
        finally:
            span.end()

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

    async def _stream(self, model: HostedModel, slot: int, prepared, queue_ms: float):
        seq = 0
        # First message: the request holds a slot and generation starts.
        yield node_pb2.GenerateChunk(seq=seq, node_id=self.node_id)
        pending_tokens = 0
        async with contextlib.aclosing(model.instance.stream(slot, prepared)) as events:
            async for event in events:
                seq += 1
                if isinstance(event, Finish):
                    yield node_pb2.GenerateChunk(
                        seq=seq,
                        token_count=pending_tokens,
                        finish_reason=FINISH_REASONS[event.reason],
                        usage=common_pb2.Usage(
                            prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens,
                            cached_prompt_tokens=event.cached_prompt_tokens,
                        ),
                        timings=common_pb2.Timings(
                            queue_ms=queue_ms,
                            prompt_ms=event.prompt_ms,
                            generation_ms=event.generation_ms,
                            time_to_first_token_ms=queue_ms + event.time_to_first_token_ms,
                        ),
                        node_id=self.node_id,
                    )
                    return
                pending_tokens += event.tokens
                if not event.text:  # held back (stop-string prefix, split character)
                    seq -= 1
                    continue
                yield node_pb2.GenerateChunk(
                    seq=seq, text=event.text, token_count=pending_tokens, node_id=self.node_id
                )
                pending_tokens = 0

    # --- models --------------------------------------------------------------
    async def LoadModel(self, request: node_pb2.LoadModelRequest, context):
        try:
            model = await self._models.load(
                request.model, slots=request.slots, context_length=request.context_length
            )
            if not self._draining:
                await self.set_serving(True)
            return self._loaded_model(model)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def UnloadModel(self, request: node_pb2.UnloadModelRequest, context):
        try:
            await self._models.unload(request.model)
            if not self._models.hosted():
                await self.set_serving(False)
            return node_pb2.UnloadModelResponse()
        except EdgefleetError as error:
            await abort_with(context, error)

    async def ListModels(self, request: node_pb2.ListModelsRequest, context):
        hosted = self._models.hosted()
        loaded_names = {model.name for model in hosted}
        store = self._models.store
        return node_pb2.ListModelsResponse(
            loaded=[self._loaded_model(model) for model in hosted],
            catalog=[
                node_pb2.CatalogModel(
                    alias=entry.alias,
                    description=entry.description,
                    quantization=entry.quantization,
                    size_bytes=entry.size_bytes,
                    cached=store.is_cached(entry),
                    loaded=entry.alias in loaded_names,
                )
                for entry in CATALOG.values()
            ],
        )

    # --- capacity and drain ----------------------------------------------------
    async def GetCapacity(self, request: node_pb2.GetCapacityRequest, context):
        return self.capacity()

    async def Drain(self, request: node_pb2.DrainRequest, context):
        await self.set_draining(request.drain)
        log.info("drain=%s (active generations: %d)", request.drain, self._active)
        return node_pb2.DrainResponse(draining=self._draining, active_generations=self._active)

    def capacity(self) -> common_pb2.Capacity:
        host = self._host.read()
        hosted = self._models.hosted()
        models = [self._loaded_model(model) for model in hosted]
        return common_pb2.Capacity(
            cpu_count=host.cpu_count,
            cpu_percent=host.cpu_percent,
            load_average_1m=host.load_average_1m,
            memory_total_bytes=host.memory_total_bytes,
            memory_available_bytes=host.memory_available_bytes,
            process_rss_bytes=host.process_rss_bytes,
            models=models,
            slots_total=sum(m.slots_total for m in models),
            slots_free=sum(m.slots_free for m in models),
            queue_depth=sum(m.queue_depth for m in models),
            queue_limit=sum(m.queue_limit for m in models),
            tokens_per_second=self._throughput.rate(),
            gpus=[
                common_pb2.GpuInfo(
                    index=gpu.index,
                    name=gpu.name,
                    memory_total_bytes=gpu.memory_total_bytes,
                    memory_used_bytes=gpu.memory_used_bytes,
                    utilization_percent=gpu.utilization_percent,
                )
                for gpu in self._gpus.read()
            ],
            draining=self._draining,
            active_generations=self._active,
            simulated=any(m.runtime == SIMULATED for m in models),
        )

    @staticmethod
    def _loaded_model(model: HostedModel) -> common_pb2.LoadedModel:
        info = model.instance.info
        return common_pb2.LoadedModel(
            alias=model.name,
            path=str(info.path),
            quantization=info.quantization,
            runtime=info.runtime,
            file_size_bytes=info.file_size_bytes,
            memory_bytes=info.memory_bytes,
            context_length=info.context_length,
            slots_total=model.pool.total,
            slots_free=model.pool.free,
            queue_depth=model.pool.queue_depth,
            queue_limit=model.pool.queue_limit,
            sha256=model.sha256,
            gpu_layers=info.gpu_layers,
        )
