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
import time
from collections.abc import AsyncIterator

import grpc

from coordinator.fleet import FleetView
from coordinator.placement import Candidate, Placement, Ranking
from edgefleet.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_from_rpc,
)
from edgefleet.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

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
        retry_after_s: float = 1.0,
    ) -> None:
        self._fleet = fleet
        self._placement = placement
        self._channels = channels
        self._admission_timeout_s = admission_timeout_s
        self._retry_after_s = retry_after_s

    @property
    def policy(self) -> str:
        return self._placement.policy

    def rank(self, model: str, *, affinity_node: str = "") -> Ranking:
        """Order the ready nodes serving ``model``; raise when none can take it."""
        started = time.perf_counter()
        if model not in self._fleet.models():
            raise NotFound(f"no node in the fleet serves model {model!r}")
        candidates = []
        for entry in self._fleet.ready_nodes():
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
        ranking = dataclasses.replace(
            self._placement.rank(candidates), decision_us=(time.perf_counter() - started) * 1e6
        )
        if not candidates:
            raise Unavailable(
                f"no ready node serves model {model!r} (nodes may be draining or failed)",
                retry_after_s=self._retry_after_s,
            )
        if not ranking.order:
            raise self._saturated(model)
        return ranking

    def _saturated(self, model: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"every node serving {model!r} is at capacity; retry in {self._retry_after_s:.0f}s",
            retry_after_s=self._retry_after_s,
        )

    async def generate(
        self, request: node_pb2.GenerateRequest, ranking: Ranking
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        """Stream the generation from the best node of ``ranking`` that admits it."""
        refused = 0
        for node_id in ranking.order:
            entry = self._fleet.nodes.get(node_id)
            if entry is None or self._fleet.is_suspect(node_id):
                continue
            call = self._channels.stub(entry.record.address).Generate(request)
            try:
                with self._fleet.dispatched(node_id):
                    first = await self._admitted(call, node_id)
                    if first is None:
                        refused += 1
                        continue
                    yield first
                    # read() only: grpc.aio forbids mixing it with async iteration.
                    while (chunk := await call.read()) is not grpc.aio.EOF:
                        yield chunk
                    return
            finally:
                call.cancel()  # no-op when finished; stops the node when the client left
        if refused:
            raise self._saturated(request.model)
        raise Unavailable(
            f"no node could take the request for {request.model!r}",
            retry_after_s=self._retry_after_s,
        )

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
