"""CoordinatorService over gRPC: membership, sessions and chat, operations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from opentelemetry import trace

from coordinator.etcd import Etcd
from coordinator.fleet import FleetView
from coordinator.keys import Keys
from coordinator.leader import Leadership
from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.placement import Ranking
from coordinator.router import Router
from coordinator.sessions import Sessions
from edgefleet import telemetry
from edgefleet.errors import EdgefleetError, InvalidArgument, NotFound, Unavailable, abort_with
from edgefleet.generation import messages_from_proto, sampling_from_proto
from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
PLACEMENT_METADATA_KEY = "edgefleet-placement-us"
MAX_TURN_BYTES = 256 * 1024
# How long a finished turn waits for etcd to come back before giving up.
COMMIT_RETRY_S = 10.0


class RequestTracker:
    """One client request: its server span, its metrics, and the reply chunks.

    It turns the nodes' chunks into the client's (counting failovers as the
    serving node changes) and records time to first token, time per output
    token, token usage and the final status.
    """

    def __init__(self, method: str, context, metrics: CoordinatorMetrics | None, sampling):
        self._method = method
        self._metrics = metrics
        self._context = context
        self._sampling = sampling
        self.model = ""
        self.status = "OK"
        self.failovers = 0
        self._node_id = ""
        self._started = time.perf_counter()
        self._first_token: float | None = None
        self._span_context = None
        self.span = trace.INVALID_SPAN

    def __enter__(self) -> RequestTracker:
        self._span_context = telemetry.tracer().start_as_current_span(
            f"chat {self._method}",
            context=telemetry.incoming_context(self._context.invocation_metadata()),
            kind=trace.SpanKind.SERVER,
        )
        self.span = self._span_context.__enter__()
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
        self._span_context.__exit__(exc_type, exc, tb)
        return False


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        *,
        coordinator_id: str,
        etcd: Etcd,
        keys: Keys,
        fleet: FleetView,
        membership: Membership,
        leadership: Leadership,
        sessions: Sessions,
        router: Router,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.coordinator_id = coordinator_id
        self._etcd = etcd
        self._keys = keys
        self._fleet = fleet
        self._membership = membership
        self._leadership = leadership
        self._sessions = sessions
        self._router = router
        self._metrics = metrics

    # --- node membership -------------------------------------------------------------
    async def Register(self, request, context):
        try:
            return await self._membership.register(request)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def Heartbeat(self, request_iterator, context):
        # aclosing: when the stream ends or breaks, the membership's clean-up
        # (node lost -> registration ended) runs now, not at garbage collection.
        async with contextlib.aclosing(self._membership.heartbeats(request_iterator)) as replies:
            async for reply in replies:
                yield reply

    async def Deregister(self, request, context):
        try:
            await self._membership.deregister(request)
            return coordinator_pb2.DeregisterResponse()
        except EdgefleetError as error:
            await abort_with(context, error)

    # --- sessions and chat ----------------------------------------------------------------
    async def CreateSession(self, request, context):
        try:
            if request.model not in self._fleet.models():
                raise NotFound(f"no node in the fleet serves model {request.model!r}")
            return await self._sessions.create(request)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def GetSession(self, request, context):
        try:
            session, _, _ = await self._sessions.get(request.session_id)
            return session
        except EdgefleetError as error:
            await abort_with(context, error)

    async def CloseSession(self, request, context):
        try:
            await self._sessions.close(request.session_id)
            return coordinator_pb2.CloseSessionResponse()
        except EdgefleetError as error:
            await abort_with(context, error)

    async def Chat(self, request: coordinator_pb2.ChatRequest, context):
        with RequestTracker("Chat", context, self._metrics, request.sampling) as tracker:
            try:
                if not request.content.strip():
                    raise InvalidArgument("content must not be empty")
                if len(request.content.encode()) > MAX_TURN_BYTES:
                    raise InvalidArgument(f"content is over {MAX_TURN_BYTES} bytes")
                sampling_from_proto(request.sampling)
                turn = await self._sessions.begin_turn(
                    request.session_id, request.content, request.resume_turn_id
                )
            except EdgefleetError as error:
                tracker.failed(error)
                await abort_with(context, error)
                return
            session = turn.session
            tracker.describe(session.model, session.session_id, self._router.policy)
            if turn.already_stored:
                # The first replica stored this turn before it failed: hand over the rest.
                stored = session.messages[-1].content
                yield coordinator_pb2.ChatChunk(
                    text=stored[len(request.assistant_prefix) :],
                    finish_reason=common_pb2.FINISH_REASON_STOP,
                    node_id=session.node_id,
                    session_id=session.session_id,
                    model=session.model,
                    turn_id=turn.turn_id,
                )
                return
            try:
                # The turn id first: a client that loses this replica resumes with it.
                yield coordinator_pb2.ChatChunk(session_id=session.session_id, turn_id=turn.turn_id)
                generate = node_pb2.GenerateRequest(
                    request_id=turn.turn_id,
                    model=session.model,
                    messages=[
                        *session.messages,
                        common_pb2.ChatMessage(role="user", content=request.content),
                    ],
                    sampling=request.sampling,
                    assistant_prefix=request.assistant_prefix,
                    session_id=session.session_id,
                )
                text = [request.assistant_prefix]
                final = None
                ranking = self._router.rank(session.model, affinity_node=session.node_id)
                async for chunk in self._router.generate(generate, ranking):
                    reply = tracker.relay(chunk, session.session_id)
                    if chunk.finish_reason:
                        final = reply
                        break
                    if chunk.text:
                        text.append(chunk.text)
                        yield reply
                self._set_placement_trailer(context, ranking)
                if final is None:
                    raise EdgefleetError("the node ended the stream without finishing")
                # Store the turn before the client hears it is over: the next turn,
                # on any replica, sees it.
                await self._commit(turn, request.content, "".join(text), final.node_id)
                yield final
            except EdgefleetError as error:
                tracker.failed(error)
                await self._release(turn)
                await abort_with(context, error)
            except BaseException:
                await self._release(turn)
                raise

    async def _commit(self, turn, content: str, reply: str, node_id: str) -> None:
        """Store the turn; if etcd is briefly away, retry for a while first."""
        deadline = asyncio.get_running_loop().time() + COMMIT_RETRY_S
        while True:
            try:
                await self._sessions.commit_turn(turn, content, reply, node_id)
                return
            except Unavailable:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _release(self, turn) -> None:
        with contextlib.suppress(EdgefleetError):  # etcd down: the lock expires with us
            await self._sessions.release(turn)

    async def Complete(self, request: coordinator_pb2.CompleteRequest, context):
        with RequestTracker("Complete", context, self._metrics, request.sampling) as tracker:
            tracker.describe(request.model, "", self._router.policy)
            try:
                messages_from_proto(request.messages)
                sampling_from_proto(request.sampling)
                generate = node_pb2.GenerateRequest(
                    request_id=uuid.uuid4().hex,
                    model=request.model,
                    messages=request.messages,
                    sampling=request.sampling,
                    constraint=request.constraint,
                    tools=request.tools,
                    assistant_prefix=request.assistant_prefix,
                )
                ranking = self._router.rank(request.model)
                async for chunk in self._router.generate(generate, ranking):
                    reply = tracker.relay(chunk, "")
                    if chunk.finish_reason:
                        self._set_placement_trailer(context, ranking)
                        yield reply
                        return
                    if chunk.text:
                        yield reply
            except EdgefleetError as error:
                tracker.failed(error)
                await abort_with(context, error)

    @staticmethod
    def _set_placement_trailer(context, ranking: Ranking) -> None:
        context.set_trailing_metadata(((PLACEMENT_METADATA_KEY, f"{ranking.decision_us:.1f}"),))

    # --- operations ---------------------------------------------------------------------
    async def FleetStatus(self, request, context):
        try:
            sessions = await self._sessions.count_by_node()
            coordinators, _ = await self._etcd.get_prefix(self._keys.coordinators)
            leader_id = await self._leadership.leader_id()
        except EdgefleetError:
            # etcd down: still show the last known fleet
            sessions, coordinators, leader_id = {}, [], ""
        now = time.time()
        nodes = []
        for entry in sorted(self._fleet.nodes.values(), key=lambda e: e.node_id):
            status = coordinator_pb2.NodeStatus()
            status.CopyFrom(entry.record)
            status.state = self._fleet.state_of(entry)
            # The replica holding the node's stream knows its last beat; others
            # know when its record was last written.
            last_beat = max(
                self._membership.last_beat.get(entry.node_id, 0.0), entry.record.heartbeat_at
            )
            status.last_heartbeat_age_seconds = max(0.0, now - last_beat)
            status.sessions = sessions.get(entry.node_id, 0)
            nodes.append(status)
        return coordinator_pb2.FleetStatusResponse(
            nodes=nodes,
            coordinator_id=self.coordinator_id,
            placement_policy=self._router.policy,
            coordinators=[
                coordinator_pb2.CoordinatorRecord.FromString(kv.value) for kv in coordinators
            ],
            leader_id=leader_id,
        )

    async def DrainNode(self, request, context):
        try:
            entry = self._fleet.nodes.get(request.node_id)
            if entry is None:
                raise NotFound(f"node {request.node_id!r} is not in the fleet")
            if request.drain:
                await self._etcd.put(self._keys.drain(request.node_id), b"1")
            else:
                await self._etcd.delete(self._keys.drain(request.node_id))
            status = coordinator_pb2.NodeStatus()
            status.CopyFrom(entry.record)
            status.state = (
                common_pb2.NODE_STATE_DRAINING if request.drain else common_pb2.NODE_STATE_READY
            )
            return coordinator_pb2.DrainNodeResponse(node=status)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def ListModels(self, request, context):
        return coordinator_pb2.ListFleetModelsResponse(
            models=[
                coordinator_pb2.FleetModel(alias=alias, ready_nodes=count)
                for alias, count in sorted(self._fleet.models().items())
            ]
        )
