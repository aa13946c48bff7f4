"""The node's membership in the fleet: register, then one heartbeat stream.

The node never talks to etcd. It registers with one of its coordinator
addresses, then streams a capacity report every heartbeat interval. When the
stream breaks or stalls it moves to the next coordinator and goes on with the
same registration; only a REREGISTER answer (its lease expired: it was fenced)
makes it register again. This is the node's one membership loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import grpc

from edgefleet import __version__
from edgefleet.errors import Reason, reason_of
from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from node_agent.identity import NodeCredentials, discover_endpoints
from node_agent.node import Node

log = logging.getLogger(__name__)
MIN_REPORT_GAP_S = 0.2
Command = coordinator_pb2.HeartbeatResponse.Command


class Fenced(Exception):
    """The coordinator no longer knows this registration."""


class Registrar:
    def __init__(
        self,
        coordinators: list[str],
        *,
        node_id: str,
        advertise: str,
        node: Node,
        labels: dict[str, str] | None = None,
        credentials: NodeCredentials | None = None,
    ) -> None:
        if not coordinators:
            raise ValueError("at least one coordinator address is needed")
        # With credentials (a secure fleet) ``coordinators`` are the client
        # ports, asked for the node listeners, where the node registers over
        # mutual TLS; without, the node registers on them in plaintext.
        self._coordinators = coordinators
        self._credentials = credentials
        self._endpoints: list[str] = list(credentials.node_endpoints) if credentials else []
        self._failures = 0
        self._node_id = node_id
        self._advertise = advertise
        self._node = node
        self._labels = labels or {}
        self.registration: coordinator_pb2.RegisterResponse | None = None
        self._current = 0
        self._leaving = False
        self.registered = asyncio.Event()

    @property
    def coordinator(self) -> str:
        targets = self._endpoints if self._credentials is not None else self._coordinators
        return targets[self._current % len(targets)] if targets else ""

    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def fetch_endpoints(self) -> list[str]:
        """Coordinators to fetch model files from: the current one first."""
        targets = self._endpoints if self._credentials is not None else self._coordinators
        current = self.coordinator
        return [current, *(t for t in targets if t != current)] if current else list(targets)

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to a coordinator's node port (mutual TLS in a secure fleet)."""
        return self._channel(address)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(address)
        return self._credentials.channel(address)

    async def _discover(self) -> None:
        """Ask the client ports where nodes register (after a full round of failures)."""
        if self._credentials is None:
            return
        if self._endpoints and self._failures < len(self._endpoints):
            return
        found = await discover_endpoints(self._credentials, self._coordinators)
        if found:
            self._endpoints = found
            self._failures = 0

    async def run(self) -> None:
        backoff = 0.2
        while not self._leaving:
            await self._discover()
            address = self.coordinator
            if not address:
                log.warning("no coordinator node listener known yet; asking again")
                self._failures = len(self._endpoints)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                async with self._channel(address) as channel:
                    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                    if self.registration is None:
                        await self._register(stub)
                    backoff = 0.2
                    self._failures = 0
                    await self._heartbeat(stub)
            except Fenced:
                if self._leaving:
                    return
                log.warning("coordinator %s fenced this node: registering again", address)
                self.registration = None
                self.registered.clear()
                continue
            except (grpc.RpcError, TimeoutError) as error:
                code = error.code() if isinstance(error, grpc.RpcError) else None
                details = (
                    error.details() if isinstance(error, grpc.RpcError) else str(error) or "stalled"
                )
                reason = reason_of(error) if isinstance(error, grpc.RpcError) else None
                if reason is Reason.NODE_PENDING:
                    log.warning("waiting for an operator's approval: %s", details)
                    backoff = 2.0
                elif reason is Reason.NODE_REVOKED or code in (
                    grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    log.error("registration refused by %s: %s", address, details)
                    backoff = max(backoff, 2.0)
                else:
                    log.warning("coordinator %s: %s; trying the next one", address, details)
                    self._current += 1
                    self._failures += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _register(self, stub) -> None:
        capacity = self._node.capacity()
        reply = await stub.Register(
            coordinator_pb2.RegisterRequest(
                node_id=self._node_id,
                address=self._advertise,
                models=[model.alias for model in capacity.models],
                capacity=capacity,
                labels=self._labels,
                version=__version__,
                pid=os.getpid(),
            ),
            timeout=10,
        )
        self.registration = reply
        if self._credentials is not None and reply.node_endpoints:
            self._credentials.remember_endpoints(reply.node_endpoints)
            self._endpoints = list(reply.node_endpoints)
        self.registered.set()
        log.info(
            "registered with %s as %s (epoch %d, lease %.1fs)",
            self.coordinator,
            reply.node_id,
            reply.epoch,
            reply.lease_ttl_seconds,
        )

    async def _heartbeat(self, stub) -> None:
        registration = self.registration
        interval = registration.heartbeat_interval_seconds or 1.0

        changed = self._node.capacity_changed

        async def beats():
            while True:
                changed.clear()
                yield coordinator_pb2.HeartbeatRequest(
                    node_id=registration.node_id,
                    epoch=registration.epoch,
                    capacity=self._node.capacity(),
                    state=(
                        common_pb2.NODE_STATE_DRAINING
                        if self._node.draining
                        else common_pb2.NODE_STATE_READY
                    ),
                )
                # Next report: at the interval, or sooner when slots change
                # (at most every MIN_REPORT_GAP_S), so placement sees load early.
                await asyncio.sleep(MIN_REPORT_GAP_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), interval - MIN_REPORT_GAP_S)

        call = stub.Heartbeat(beats())
        try:
            while True:
                # A coordinator that stops answering (frozen, cut off) is left.
                reply = await asyncio.wait_for(call.read(), interval * 3 + 2)
                if reply is grpc.aio.EOF:
                    raise TimeoutError("the coordinator closed the heartbeat stream")
                if reply.command == Command.COMMAND_REREGISTER:
                    raise Fenced()
                if reply.command == Command.COMMAND_DRAIN:
                    log.info("coordinator asks this node to drain")
                    await self._node.set_draining(True)
                elif reply.command == Command.COMMAND_RESUME:
                    log.info("coordinator asks this node to resume")
                    await self._node.set_draining(False)
        finally:
            call.cancel()

    async def deregister(self) -> None:
        """Leave the fleet at once (graceful shutdown), best effort."""
        self._leaving = True
        registration = self.registration
        if registration is None:
            return
        try:
            async with self._channel(self.coordinator) as channel:
                await coordinator_pb2_grpc.CoordinatorServiceStub(channel).Deregister(
                    coordinator_pb2.DeregisterRequest(
                        node_id=registration.node_id, epoch=registration.epoch
                    ),
                    timeout=3,
                )
            log.info("deregistered from %s", self.coordinator)
        except grpc.RpcError as error:
            log.warning("deregister failed (%s); the lease will expire", error.details())
        self.registration = None
