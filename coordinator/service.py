"""CoordinatorService over gRPC: membership, sessions and chat, operations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from coordinator.completions import Completions, RequestTracker
from coordinator.etcd import Etcd
from coordinator.fleet import FleetView
from coordinator.keys import Keys
from coordinator.leader import Leadership
from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.placement import Ranking
from coordinator.router import Router
from coordinator.sessions import Sessions
from edgefleet.errors import EdgefleetError, InvalidArgument, NotFound, Unavailable, abort_with
from edgefleet.generation import sampling_from_proto
from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
PLACEMENT_METADATA_KEY = "edgefleet-placement-us"
MAX_TURN_BYTES = 256 * 1024
# How long a finished turn waits for etcd to come back before giving up.
COMMIT_RETRY_S = 10.0


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
        completions: Completions,
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
        self._completions = completions

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
        with RequestTracker(
            "Chat", context.invocation_metadata(), self._metrics, request.sampling
        ) as tracker:
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
                ranking = self._router.rank(
                    session.model, affinity_node=session.node_id, parent=tracker.context
                )
                async for chunk in self._router.generate(generate, ranking, parent=tracker.context):
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
        try:
            async for chunk, placement_us in self._completions.stream(
                request, method="Complete", metadata=context.invocation_metadata()
            ):
                if chunk.finish_reason:
                    context.set_trailing_metadata(
                        ((PLACEMENT_METADATA_KEY, f"{placement_us:.1f}"),)
                    )
                yield chunk
        except EdgefleetError as error:
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
