"""Running one generation on the fleet: place it, stream it from a node.

The router ranks candidate nodes (``placement``), opens the node's Generate
stream and hands its chunks on. A node that refuses before admitting the
request (full queue, stale view, gone) is skipped for the next one; a node
that cannot be reached is excluded from placement at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from coordinator.fleet import FleetView
from coordinator.metrics import CoordinatorMetrics
from coordinator.placement import Candidate, Placement, Ranking
from edgefleet import telemetry
from edgefleet.errors import (
    EdgefleetError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_from_rpc,
)
from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)


PLACEMENT_OUTCOMES = {
    NotFound: "unknown_model",
    Unavailable: "no_node",
    ResourceExhausted: "saturated",
}


class NodeFailed(Exception):
    """A node broke, stalled or misbehaved in the middle of a stream."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # stall | stream_error | malformed | fenced


# Codes that say "this node cannot serve now" rather than "the request is bad".
NODE_FAULT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class NodeChannels:
    """One long-lived gRPC channel per node address."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return node_pb2_grpc.NodeServiceStub(channel)

    async def close(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close_all(self) -> None:
        for address in list(self._channels):
            await self.close(address)


class Router:
    def __init__(
        self,
        fleet: FleetView,
        placement: Placement,
        channels: NodeChannels,
        *,
        admission_timeout_s: float = 30.0,
        first_token_timeout_s: float = 15.0,
        stall_timeout_s: float = 2.0,
        max_failovers: int = 3,
        retry_after_s: float = 1.0,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self._fleet = fleet
        self._placement = placement
        self._channels = channels
        self._admission_timeout_s = admission_timeout_s
        self._first_token_timeout_s = first_token_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._max_failovers = max_failovers
        self._metrics = metrics
        self._retry_after_s = retry_after_s

    @property
    def policy(self) -> str:
        return self._placement.policy

    def rank(
        self,
        model: str,
        *,
        affinity_node: str = "",
        exclude: set[str] = frozenset(),
        parent: Context | None = None,
    ) -> Ranking:
        """Order the ready nodes serving ``model``; raise when none can take it."""
        with telemetry.tracer().start_as_current_span("placement", context=parent) as span:
            try:
                ranking = self._rank(model, affinity_node, exclude)
            except EdgefleetError as error:
                self._count_placement(PLACEMENT_OUTCOMES.get(type(error), "error"))
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                raise
            self._count_placement("placed", ranking.decision_us)
            if span.is_recording():
                span.set_attributes(
                    {
                        "edgefleet.placement.policy": ranking.policy,
                        "edgefleet.placement.candidates": [
                            f"{node}={ranking.scores[node]:.2f}" for node in ranking.order
                        ],
                        "edgefleet.placement.saturated": list(ranking.saturated),
                        "edgefleet.placement.decision_us": ranking.decision_us,
                        "edgefleet.node.id": ranking.order[0],
                    }
                )
            return ranking

    def _count_placement(self, outcome: str, decision_us: float | None = None) -> None:
        if self._metrics is not None:
            self._metrics.placements.labels(self._placement.policy, outcome).inc()
            if decision_us is not None:
                self._metrics.placement_duration.observe(decision_us / 1e6)

    def _rank(self, model: str, affinity_node: str, exclude: set[str]) -> Ranking:
        started = time.perf_counter()
        nodes = list(self._fleet.nodes.values())
        candidates = []
        sample_size = self._placement.sample
        if len(nodes) > sample_size and self._placement.policy != "round_robin":
            # A large fleet: rank a random sample plus the session's node (the
            # "power of d choices"), so a decision costs the same at 1,000
            # nodes as at the sample size. Only when no sampled node has a free slot is
            # the whole fleet ranked.
            sample = random.sample(nodes, sample_size)
            affinity_entry = self._fleet.nodes.get(affinity_node)
            if affinity_entry is not None and affinity_entry not in sample:
                sample.append(affinity_entry)
            candidates = self._candidates(sample, model, affinity_node, exclude)
            if not any(c.free_now for c in candidates):
                candidates = []
        if not candidates:
            candidates = self._candidates(nodes, model, affinity_node, exclude)
        ranking = dataclasses.replace(
            self._placement.rank(candidates), decision_us=(time.perf_counter() - started) * 1e6
        )
        if not candidates and model not in self._fleet.models():
            raise NotFound(f"no node in the fleet serves model {model!r}")
        if not candidates:
            raise Unavailable(
                f"no ready node serves model {model!r} (nodes may be draining or failed)",
                retry_after_s=self._retry_after_s,
            )
        if not ranking.order:
            raise self._saturated(model)
        return ranking

    def _candidates(
        self, entries: list, model: str, affinity_node: str, exclude: set[str]
    ) -> list[Candidate]:
        candidates = []
        for entry in entries:
            if entry.node_id in exclude or not self._fleet.is_ready(entry):
                continue
            loaded = entry.model(model)
            if loaded is None:
                continue
            candidates.append(
                Candidate(
                    node_id=entry.node_id,
                    slots_total=loaded.slots_total,
                    slots_free=loaded.slots_free,
                    queue_depth=loaded.queue_depth,
                    queue_limit=loaded.queue_limit,
                    tokens_per_second=entry.record.capacity.tokens_per_second,
                    pending=self._fleet.pending(entry.node_id),
                    affinity=entry.node_id == affinity_node,
                )
            )
        return candidates

    def _saturated(self, model: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"every node serving {model!r} is at capacity; retry in {self._retry_after_s:.0f}s",
            retry_after_s=self._retry_after_s,
        )

    async def generate(
        self, request: node_pb2.GenerateRequest, ranking: Ranking, *, parent: Context | None = None
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        """Stream a generation; if its node fails mid-reply, continue on another.

        Chunks are the nodes' own, except that after a failover ``seq`` keeps
        counting from where the client is and the final usage covers every
        attempt. The caller sees one uninterrupted stream.
        """
        sent: list[str] = []
        sent_tokens = 0
        failures: list[str] = []
        seq = 0
        attempt = request
        request_span = trace.get_current_span(parent)
        while True:
            node_id, epoch, call, first, span = await self._start(
                attempt, ranking, failures, parent
            )
            carried = sent_tokens  # tokens of earlier attempts, now in the prompt as prefix
            try:
                async for chunk in self._follow(call, node_id, epoch, first):
                    if chunk.finish_reason:
                        chunk.usage.completion_tokens += carried
                        chunk.usage.prompt_tokens = max(0, chunk.usage.prompt_tokens - carried)
                    elif chunk.text:
                        sent.append(chunk.text)
                        sent_tokens += chunk.token_count
                    chunk.seq = seq
                    seq += 1
                    yield chunk
                    if chunk.finish_reason:
                        return
            except NodeFailed as failure:
                cause = f"{node_id}: {failure}"
                failures.append(node_id)
                self._fleet.suspect(node_id, str(failure))
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(failure)))
                request_span.add_event(
                    "failover",
                    {
                        "edgefleet.failover.cause": failure.kind,
                        "edgefleet.failover.detail": str(failure),
                        "edgefleet.node.id": node_id,
                        "edgefleet.failover.attempt": len(failures),
                        "edgefleet.failover.tokens_sent": sent_tokens,
                    },
                )
                if self._metrics is not None:
                    self._metrics.failovers.labels(failure.kind).inc()
                log.warning(
                    "generation %s failed on %s (%s) after %d token(s); failing over",
                    request.request_id,
                    node_id,
                    failure,
                    sent_tokens,
                )
                if len(failures) > self._max_failovers:
                    raise Unavailable(
                        f"the generation failed on {len(failures)} nodes; last: {cause}"
                    ) from None
                attempt = self._continuation(request, "".join(sent), sent_tokens)
                if attempt is None:  # max_tokens already reached
                    yield node_pb2.GenerateChunk(
                        seq=seq,
                        finish_reason=common_pb2.FINISH_REASON_LENGTH,
                        usage=common_pb2.Usage(completion_tokens=sent_tokens),
                        node_id=node_id,
                    )
                    return
                try:
                    ranking = self.rank(request.model, exclude=set(failures), parent=parent)
                except EdgefleetError as error:
                    raise Unavailable(
                        f"node {cause} failed mid-reply and no other node can take over: "
                        f"{error.message}"
                    ) from None
            finally:
                call.cancel()  # no-op when finished; stops the node when the client left
                span.end()
                self._fleet.release(node_id)

    @staticmethod
    def _continuation(
        request: node_pb2.GenerateRequest, sent_text: str, sent_tokens: int
    ) -> node_pb2.GenerateRequest | None:
        """The same request, continuing after the text the client already has."""
        attempt = node_pb2.GenerateRequest()
        attempt.CopyFrom(request)
        attempt.assistant_prefix = request.assistant_prefix + sent_text
        if request.sampling.HasField("max_tokens"):
            left = request.sampling.max_tokens - sent_tokens
            if left <= 0:
                return None
            attempt.sampling.max_tokens = left
        return attempt

    async def _start(self, request, ranking: Ranking, failures: list[str], parent: Context | None):
        """Open the stream on the best node that admits it.

        Returns (node, epoch, call, first chunk, attempt span); the span is the
        parent of the node's own spans and ends with the attempt.
        """
        refused = 0
        for node_id in ranking.order:
            entry = self._fleet.nodes.get(node_id)
            if entry is None or self._fleet.is_suspect(node_id) or node_id in failures:
                continue
            span = telemetry.tracer().start_span(
                f"attempt {node_id}",
                context=parent,
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "edgefleet.node.id": node_id,
                    "edgefleet.failover.attempt": len(failures),
                    "server.address": entry.record.address,
                },
            )
            self._fleet.dispatch(node_id)
            call = self._channels.stub(entry.record.address).Generate(
                request, metadata=telemetry.outgoing_metadata(span)
            )
            try:
                first = await self._admitted(call, node_id)
            except BaseException:
                self._fleet.release(node_id)
                raise
            if first is None:
                self._fleet.release(node_id)
                call.cancel()
                span.set_status(trace.Status(trace.StatusCode.ERROR, "not admitted"))
                span.end()
                refused += 1
                continue
            return node_id, entry.epoch, call, first, span
        if refused:
            raise self._saturated(request.model)
        raise Unavailable(
            f"no node could take the request for {request.model!r}",
            retry_after_s=self._retry_after_s,
        )

    async def _follow(self, call, node_id: str, epoch: int, first: node_pb2.GenerateChunk):
        """The node's chunks after admission, checked; raises NodeFailed on any fault."""
        expected_seq = first.seq + 1
        deadline = self._first_token_timeout_s
        while True:
            try:
                # asyncio.timeout, not wait_for: no extra task per token.
                async with asyncio.timeout(deadline):
                    chunk = await call.read()
            except TimeoutError:
                raise NodeFailed("stall", f"no token for {deadline:g}s") from None
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise error_from_rpc(error) from None  # the request's fault, not the node's
                raise NodeFailed(
                    "stream_error", f"{error.code().name}: {error.details()}"
                ) from None
            if chunk is grpc.aio.EOF:
                raise NodeFailed("stream_error", "stream ended before the reply finished")
            if chunk.seq != expected_seq or (chunk.node_id and chunk.node_id != node_id):
                raise NodeFailed(
                    "malformed", f"out-of-order chunk (seq {chunk.seq}, expected {expected_seq})"
                )
            entry = self._fleet.nodes.get(node_id)
            if entry is None or entry.epoch != epoch:
                raise NodeFailed("fenced", "the node's registration ended (lease lost)")
            expected_seq += 1
            if chunk.text:
                deadline = self._stall_timeout_s
            yield chunk
            if chunk.finish_reason:
                return

    async def _admitted(self, call, node_id: str) -> node_pb2.GenerateChunk | None:
        """The node's first message, or None when the node refused or failed."""
        try:
            first = await asyncio.wait_for(call.read(), self._admission_timeout_s)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return None
            if code in NODE_FAULT_CODES:
                self._fleet.suspect(node_id, f"{code.name}: {error.details()}")
                return None
            if code == grpc.StatusCode.FAILED_PRECONDITION and "not loaded" in (
                error.details() or ""
            ):
                return None  # our view was stale; another node may have it
            raise error_from_rpc(error) from None
        except TimeoutError:
            self._fleet.suspect(node_id, "no admission within the deadline")
            return None
        if first is grpc.aio.EOF:
            raise FailedPrecondition(f"node {node_id} ended the stream without an answer")
        return first
