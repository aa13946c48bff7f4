"""Running one generation on the fleet: place it, stream it from a node.

The router asks ``placement`` for the nodes to try, opens the best node's
Generate stream and hands its chunks on. What happens when a node answers
with an error is decided once, by the error's named reason (``verdict``): a
node that cannot take the request now (full queue, stale view, draining) is
skipped for the next one; a node that broke is excluded from placement at
once and the reply continues elsewhere; a request that is itself at fault
goes back to the client and never counts against a node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from coordinator import placement
from coordinator.fleet import FleetView
from coordinator.metrics import CoordinatorMetrics
from coordinator.model_loads import LoadWait, ModelLoads
from coordinator.model_registry import ModelRegistry
from coordinator.placement import Placement, PlacementRequest, Ranking
from edgefleet import telemetry, tls
from edgefleet.errors import (
    EdgefleetError,
    Reason,
    error_from_rpc,
    error_of,
    reason_of,
)
from edgefleet.generation import QUEUED_METADATA_KEY, continued, count_carried_tokens
from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)


PLACEMENT_OUTCOMES = {
    Reason.UNKNOWN_MODEL: "unknown_model",
    Reason.NO_READY_NODE: "no_node",
    Reason.FLEET_SATURATED: "saturated",
}


# Placement failures an on-demand load may cure: no ready node has the model loaded.
ON_DEMAND = frozenset({Reason.UNKNOWN_MODEL, Reason.NO_READY_NODE})


# How often a queued request checks that its node still holds its registration.
QUEUE_CHECK_S = 0.5
# How often a continued reply that every node refused for now tries again.
CONTINUATION_RETRY_S = 0.25
# Why no node took a continued reply: the failover is exhausted.
NO_TAKER = frozenset({Reason.FLEET_SATURATED, Reason.NO_READY_NODE, Reason.UNKNOWN_MODEL})


# Codes no edgefleet node answers Generate with: whatever listens there is not one.
PROTOCOL_BREAKS = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)


class NodeFailed(Exception):
    """A node broke, stalled or misbehaved in the middle of a stream."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # stall | stream_error | malformed | fenced


class Verdict(enum.Enum):
    """What a node's error means for the request."""

    NEXT_NODE = "next_node"  # the node cannot take it now; not a fault: try the next
    NODE_FAULT = "node_fault"  # the node broke: exclude it, fail over
    CALLER_ERROR = "caller_error"  # the request itself is at fault: tell the client


# The node cannot take it, but another may (its view of itself is newer than ours).
NOT_NOW = frozenset(
    {
        Reason.QUEUE_FULL,
        Reason.MODEL_NOT_LOADED,
        Reason.MODEL_UNLOADING,
        Reason.NODE_DRAINING,
        Reason.RUNTIME_UNSUPPORTED,
    }
)


def verdict(code: grpc.StatusCode, reason: Reason | None) -> Verdict:
    """Decide by the named reason; without one (a transport failure, or a peer
    that is not an edgefleet node) by the code alone."""
    if reason is not None and reason.code == code:
        if reason in NOT_NOW:
            return Verdict.NEXT_NODE
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            return Verdict.CALLER_ERROR
        return Verdict.NODE_FAULT
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Verdict.NEXT_NODE
    # No reason named: whatever else answered is not behaving like a node
    # (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNIMPLEMENTED, ...).
    return Verdict.NODE_FAULT


CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class NodeChannels:
    """One long-lived gRPC channel per node (address and id).

    With ``credentials`` (a secure fleet) each channel is mutual TLS and checks
    that the peer's certificate names the node id it dials, so a registration
    that points at another node's address gets nowhere. When this replica's
    certificate is renewed, new calls use new channels; the old ones are
    closed ``retire_after_s`` later, so streams on them finish.
    """

    def __init__(
        self,
        credentials: Callable[[], grpc.ChannelCredentials] | None = None,
        *,
        retire_after_s: float = 600.0,
    ) -> None:
        self._credentials = credentials
        self._retire_after_s = retire_after_s
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        # Channels opened with a replaced certificate, closed later (streams finish).
        self._retired: list[tuple[tuple[str, str], grpc.aio.Channel]] = []
        self._retiring: set[asyncio.Task] = set()

    def stub(self, address: str, node_id: str) -> node_pb2_grpc.NodeServiceStub:
        key = (address, node_id if self._credentials else "")
        channel = self._channels.get(key)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(
                    address,
                    self._credentials(),
                    options=CHANNEL_OPTIONS + tls.channel_options(tls.node_dns(node_id)),
                )
            self._channels[key] = channel
        return node_pb2_grpc.NodeServiceStub(channel)

    def renewed(self) -> None:
        """Our certificate changed: open new channels, retire the old ones later."""
        old, self._channels = list(self._channels.items()), {}
        self._retire(old, self._retire_after_s)

    def forget_node(self, node_id: str, close_after_s: float = 5.0) -> None:
        """A revoked node: no new call reaches it. Its streams fail over at their
        next chunk (its registration is gone) and cancel their calls; the
        channels close a moment later. (Closing a channel under a pending read
        would cancel the relaying task itself, not fail the stream over.)"""
        doomed = [(k, self._channels.pop(k)) for k in list(self._channels) if k[1] == node_id]
        doomed += [item for item in self._retired if item[0][1] == node_id]
        self._retired = [item for item in self._retired if item[0][1] != node_id]
        self._retire(doomed, close_after_s)

    def _retire(self, items: list, after_s: float) -> None:
        """Close these channels ``after_s`` from now, unless closed before."""
        self._retired.extend(items)

        async def close_later():
            await asyncio.sleep(after_s)
            for item in items:
                if item in self._retired:
                    self._retired.remove(item)
                    await item[1].close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, address: str) -> None:
        for key in [k for k in self._channels if k[0] == address]:
            await self._channels.pop(key).close()

    async def close_all(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for _, channel in self._retired:
            await channel.close()
        self._retired.clear()
        for key in list(self._channels):
            await self._channels.pop(key).close()


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
        metrics: CoordinatorMetrics | None = None,
        rng: random.Random | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        self._fleet = fleet
        self._placement = placement
        self._channels = channels
        self._admission_timeout_s = admission_timeout_s
        self._first_token_timeout_s = first_token_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._max_failovers = max_failovers
        self._metrics = metrics
        self._rng = rng or random.Random()
        # Models no ready node serves, loaded on demand where some node can.
        self.loads = ModelLoads(fleet, channels, metrics=metrics, registry=registry)

    @property
    def policy(self) -> str:
        return self._placement.policy

    def rank(
        self,
        model: str,
        *,
        affinity_node: str = "",
        exclude: frozenset[str] = frozenset(),
        continuation: bool = False,
        parent: Context | None = None,
    ) -> Ranking:
        """Order the ready nodes serving ``model``; raise when none can take it."""
        with telemetry.tracer().start_as_current_span("placement", context=parent) as span:
            started = time.perf_counter()
            try:
                ranking = placement.choose(
                    self._fleet,
                    PlacementRequest(model, affinity_node, frozenset(exclude), continuation),
                    self._placement,
                    self._rng,
                    turn=self._placement.next_turn() if self.policy == "round_robin" else 0,
                )
            except EdgefleetError as error:
                self._count_placement(PLACEMENT_OUTCOMES.get(error.reason, "error"))
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                raise
            ranking = dataclasses.replace(
                ranking, decision_us=(time.perf_counter() - started) * 1e6
            )
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

    async def place(
        self, model: str, *, affinity_node: str = "", parent: Context | None = None
    ) -> tuple[Ranking, LoadWait | None]:
        """``rank``, and when no ready node serves ``model`` but some ready node
        can load it, load it there first (the request waits; concurrent ones
        share the load): the ranking, and the wait for a load if there was one."""
        try:
            return self.rank(model, affinity_node=affinity_node, parent=parent), None
        except EdgefleetError as error:
            if error.reason not in ON_DEMAND or not self.loads.loadable(model):
                raise
            unplaced = error
        wait = None
        node_id = self.loads.fresh_node(model)  # loaded a moment ago, not yet in the view
        if not node_id:
            try:
                wait = await self.loads.ensure(model, parent=parent)
            except EdgefleetError as error:
                if error.reason is Reason.UNKNOWN_MODEL:
                    raise unplaced from None
                raise
            node_id = wait.node_id
            trace.get_current_span(parent).add_event(
                "model_load",
                {
                    "gen_ai.request.model": model,
                    "edgefleet.node.id": node_id,
                    "edgefleet.model_load.wait_ms": wait.waited_ms,
                    "edgefleet.model_load.shared": wait.shared,
                },
            )
        try:
            ranking = self.rank(model, affinity_node=affinity_node, parent=parent)
        except EdgefleetError as error:
            if error.reason not in ON_DEMAND:
                raise
            # The node's next report shows the model; until then, that node alone.
            ranking = Ranking(
                policy=self.policy, order=(node_id,), scores={node_id: 0.0}, saturated=()
            )
        return ranking, wait

    def _count_placement(self, outcome: str, decision_us: float | None = None) -> None:
        if self._metrics is not None:
            self._metrics.placements.labels(self._placement.policy, outcome).inc()
            if decision_us is not None:
                self._metrics.placement_duration.observe(decision_us / 1e6)

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
            node_id, epoch, call, first, span = await self._start_owed(
                attempt, ranking, failures, parent
            )
            carried = sent_tokens  # tokens of earlier attempts, now in the prompt as prefix
            try:
                async for chunk in self._follow(call, node_id, epoch, first):
                    if chunk.finish_reason:
                        count_carried_tokens(chunk.usage, carried)
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
                if failure.kind == "malformed":
                    self._fleet.quarantine(node_id, str(failure))
                else:
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
                    raise error_of(
                        Reason.FAILOVER_EXHAUSTED,
                        f"the generation failed on {len(failures)} nodes; last: {cause}",
                    ) from None
                attempt = continued(request, "".join(sent), sent_tokens)
                if attempt is not None:
                    attempt.continuation = True  # head of the queue, reserved slots
                if attempt is None:  # max_tokens already reached
                    yield node_pb2.GenerateChunk(
                        seq=seq,
                        finish_reason=common_pb2.FINISH_REASON_LENGTH,
                        usage=common_pb2.Usage(completion_tokens=sent_tokens),
                        node_id=node_id,
                    )
                    return
                ranking = None  # _start_owed ranks the rest of the fleet
            finally:
                call.cancel()  # no-op when finished; stops the node when the client left
                span.end()
                self._fleet.release(node_id)

    async def _start_owed(
        self, request, ranking: Ranking | None, failures: list[str], parent: Context | None
    ):
        """``_start``; for a continued reply (``ranking`` None), which a client is
        already reading, the nodes left are ranked and, while every one refuses
        it for now (full, unloading, or suspected after a fault until its next
        report), tried again for up to the admission timeout instead of failing
        the stream. With no such node left it fails at once."""
        if ranking is not None:
            return await self._start(request, ranking, failures, parent)
        deadline = time.monotonic() + self._admission_timeout_s
        while True:
            try:
                ranking = self.rank(
                    request.model, exclude=frozenset(failures), continuation=True, parent=parent
                )
                return await self._start(request, ranking, failures, parent)
            except EdgefleetError as error:
                if (
                    error.reason in (Reason.FLEET_SATURATED, Reason.NO_READY_NODE)
                    and time.monotonic() < deadline
                    and self._fleet.could_take_over(request.model, failures)
                ):
                    await asyncio.sleep(CONTINUATION_RETRY_S)  # refused for now: wait
                    continue
                if error.reason not in NO_TAKER:
                    raise  # the request's own fault, as the node said
                raise error_of(
                    Reason.FAILOVER_EXHAUSTED,
                    f"node {failures[-1]} failed mid-reply and no other node can take over: "
                    f"{error.message}",
                ) from None

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
            request.origin = self._fleet.origin  # the node counts it as ours in its reports
            self._fleet.dispatch(node_id)
            call = self._channels.stub(entry.record.address, node_id).Generate(
                request, metadata=telemetry.outgoing_metadata(span)
            )
            try:
                first = await self._admitted(call, node_id, entry.epoch)
            except BaseException:
                self._fleet.release(node_id)
                span.end()
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
            raise placement.saturated_error(request.model, self._placement.retry_after_s)
        raise error_of(
            Reason.NO_READY_NODE,
            f"no node could take the request for {request.model!r}",
            retry_after_s=self._placement.retry_after_s,
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
                if verdict(error.code(), reason_of(error)) is Verdict.CALLER_ERROR:
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

    async def _admitted(self, call, node_id: str, epoch: int) -> node_pb2.GenerateChunk | None:
        """The node's first message, or None when it did not admit the request
        (refused for now, or failed: then it is also excluded from placement).

        A node that queues the request says so at once (initial metadata); a
        queued request then waits for its slot as long as the node stays
        registered, instead of being failed over as if the node had stalled.
        """
        read = asyncio.ensure_future(call.read())
        try:
            async with asyncio.timeout(self._admission_timeout_s) as window:
                position = queue_position(await call.initial_metadata())
                if position:
                    window.reschedule(None)
                    await self._while_registered(read, node_id, epoch)
                first = await read
        except grpc.RpcError as error:
            judged = verdict(error.code(), reason_of(error))
            if judged is Verdict.CALLER_ERROR:
                raise error_from_rpc(error) from None
            if judged is Verdict.NODE_FAULT:
                cause = f"{error.code().name}: {error.details()}"
                if error.code() in PROTOCOL_BREAKS and reason_of(error) is None:
                    self._fleet.quarantine(node_id, cause)  # not an edgefleet node's answer
                else:
                    self._fleet.suspect(node_id, cause)
            return None
        except TimeoutError:
            self._fleet.suspect(node_id, "no admission within the deadline")
            return None
        finally:
            if not read.done():
                read.cancel()
        if first is grpc.aio.EOF:
            # Not the client's problem: the node broke the protocol; try another.
            self._fleet.quarantine(node_id, "ended the stream without an answer")
            return None
        return first

    async def _while_registered(self, read: asyncio.Future, node_id: str, epoch: int) -> None:
        """Wait for ``read`` while the node keeps its registration (a queued
        request); TimeoutError when the node's lease ends or it turns suspect."""
        while not read.done():
            await asyncio.wait({read}, timeout=QUEUE_CHECK_S)
            entry = self._fleet.nodes.get(node_id)
            if not read.done() and (
                entry is None or entry.epoch != epoch or self._fleet.is_suspect(node_id)
            ):
                raise TimeoutError


def queue_position(metadata) -> int:
    """The queue position a node reported in its initial metadata; 0 if none."""
    for key, value in metadata or ():
        if key == QUEUED_METADATA_KEY:
            return int(value) if value.isdigit() else 1
    return 0
