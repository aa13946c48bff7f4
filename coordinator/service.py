"""CoordinatorService over gRPC: a thin adapter over the coordinator's use cases.

Each method turns a request into a call on ``Membership``, ``Turns``,
``Sessions`` or ``FleetView`` and an ``EdgefleetError`` into a status with
its named reason; no rule lives here.
"""

from __future__ import annotations

import contextlib
import logging
import time

from coordinator.fleet import FleetView, without_details
from coordinator.leader import Leadership
from coordinator.membership import Membership
from coordinator.replica import ReplicaLease
from coordinator.router import Router
from coordinator.sessions import Sessions
from coordinator.turns import Turns
from edgefleet.auth import ADMIN, CALLER
from edgefleet.errors import EdgefleetError, abort_with
from edgefleet.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
PLACEMENT_METADATA_KEY = "edgefleet-placement-us"


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        *,
        coordinator_id: str,
        replica: ReplicaLease,
        fleet: FleetView,
        membership: Membership,
        leadership: Leadership,
        sessions: Sessions,
        router: Router,
        turns: Turns,
    ) -> None:
        self.coordinator_id = coordinator_id
        self._replica = replica
        self._fleet = fleet
        self._membership = membership
        self._leadership = leadership
        self._sessions = sessions
        self._router = router
        self._turns = turns

    # --- node membership -------------------------------------------------------------
    async def Register(self, request, context):
        try:
            return await self._membership.register(request)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def Heartbeat(self, request_iterator, context):
        # aclosing: when the stream ends or breaks, the membership's clean-up
        # (node lost -> registration ended) runs now, not at garbage collection.
        try:
            async with contextlib.aclosing(
                self._membership.heartbeats(request_iterator)
            ) as replies:
                async for reply in replies:
                    yield reply
        except EdgefleetError as error:
            await abort_with(context, error)

    async def Deregister(self, request, context):
        try:
            await self._membership.deregister(request)
            return coordinator_pb2.DeregisterResponse()
        except EdgefleetError as error:
            await abort_with(context, error)

    # --- sessions and chat ----------------------------------------------------------------
    async def CreateSession(self, request, context):
        try:
            return await self._turns.create_session(request)
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
        replies = self._turns.session_turn(request, metadata=context.invocation_metadata())
        async for chunk in self._relay(replies, context):
            yield chunk

    async def Complete(self, request: coordinator_pb2.CompleteRequest, context):
        replies = self._turns.complete(
            request, method="Complete", metadata=context.invocation_metadata()
        )
        async for chunk in self._relay(replies, context):
            yield chunk

    @staticmethod
    async def _relay(replies, context):
        """Stream a turn's chunks; the placement time goes in the trailers."""
        try:
            async with contextlib.aclosing(replies) as stream:
                async for chunk, placement_us in stream:
                    if chunk.finish_reason:
                        context.set_trailing_metadata(
                            ((PLACEMENT_METADATA_KEY, f"{placement_us:.1f}"),)
                        )
                    yield chunk
        except EdgefleetError as error:
            await abort_with(context, error)

    # --- operations ---------------------------------------------------------------------
    async def FleetStatus(self, request, context):
        try:
            sessions = await self._sessions.count_by_node()
            coordinators = await self._replica.replicas()
            leader_id = await self._leadership.leader_id()
        except EdgefleetError:
            # etcd down: still show the last known fleet
            sessions, coordinators, leader_id = {}, [], ""
        status = coordinator_pb2.FleetStatusResponse(
            nodes=self._fleet.statuses(self._membership.last_beat, sessions, time.time()),
            coordinator_id=self.coordinator_id,
            placement_policy=self._router.policy,
            coordinators=coordinators,
            leader_id=leader_id,
        )
        if not CALLER.get().can(ADMIN):
            without_details(status)
        return status

    async def DrainNode(self, request, context):
        try:
            node = await self._fleet.set_drain(request.node_id, request.drain)
            return coordinator_pb2.DrainNodeResponse(node=node)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def ListModels(self, request, context):
        return coordinator_pb2.ListFleetModelsResponse(
            models=[
                coordinator_pb2.FleetModel(alias=alias, ready_nodes=count)
                for alias, count in sorted(self._fleet.models().items())
            ]
        )
