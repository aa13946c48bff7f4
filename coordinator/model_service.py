"""ModelService over gRPC: a thin adapter over ``coordinator.model_registry``.

Who may call what is the guard's table (``CLIENT_POLICIES`` and
``NODE_POLICIES`` in ``coordinator.security``): operators add and remove,
nodes fetch (on the node listener, with their fleet certificate).
"""

from __future__ import annotations

import asyncio
import logging

from coordinator.deployments import Deployments
from coordinator.model_registry import CHUNK, ModelRegistry
from edgefleet.auth import CALLER
from edgefleet.errors import EdgefleetError, Reason, abort_with, error_of
from edgefleet.model_store import read_chunks, sendable_size
from edgefleet.v1 import models_pb2, models_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
# Uploads at once on this replica (each holds a file open and a disk reservation).
MAX_UPLOADS = 2


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry, deployments: Deployments, *, audit=None) -> None:
        self._registry = registry
        self._deployments = deployments
        self._audit = audit  # Access.audit in a secure fleet
        self._uploads = asyncio.Semaphore(MAX_UPLOADS)

    async def AddModel(self, request_iterator, context):
        try:
            if self._uploads.locked():
                raise error_of(
                    Reason.UPLOADS_BUSY,
                    f"{MAX_UPLOADS} uploads are in progress on this coordinator; try again later",
                )
            async with self._uploads:
                first = await anext(aiter(request_iterator), None)
                if first is None or first.WhichOneof("part") != "header":
                    raise error_of(
                        Reason.INVALID_REQUEST, "an upload starts with its header message"
                    )

                async def chunks():
                    async for message in request_iterator:
                        if message.WhichOneof("part") != "chunk":
                            raise error_of(Reason.INVALID_REQUEST, "one header per upload")
                        yield message.chunk

                record = await self._registry.add(first.header, chunks())
                if self._audit is not None:
                    await self._audit(
                        CALLER.get(),
                        "model.add",
                        first.header.alias,
                        variant=record.variants[-1].variant,
                        sha256=record.variants[-1].sha256,
                    )
                return record
        except EdgefleetError as error:
            await abort_with(context, error)

    async def ListRegistry(self, request, context):
        return models_pb2.ListRegistryResponse(models=self._registry.all())

    async def RemoveModel(self, request, context):
        try:
            await self._registry.remove(
                request.alias, request.variant, deployed=request.alias in self._deployments.wanted
            )
            if self._audit is not None:
                await self._audit(
                    CALLER.get(), "model.remove", request.alias, variant=request.variant
                )
        except EdgefleetError as error:
            await abort_with(context, error)
        return models_pb2.RemoveModelResponse()

    async def FetchModel(self, request, context):
        path = self._registry.file_path(request.alias, request.sha256)
        try:
            size = sendable_size(
                path,
                request.offset,
                f"this coordinator holds no file of {request.alias!r} with sha256 "
                f"{request.sha256[:12] or '(none)'}",
            )
            log.info("sending %s from byte %d of %d", request.alias, request.offset, size)
            async for data in read_chunks(path, request.offset, CHUNK):
                yield models_pb2.FetchModelChunk(data=data, size_bytes=size)
        except EdgefleetError as error:
            await abort_with(context, error)

    async def Deploy(self, request, context):
        try:
            deployment = await self._deployments.deploy(request)
            if self._audit is not None:
                await self._audit(
                    CALLER.get(),
                    "model.deploy",
                    request.alias,
                    replicas=str(request.replicas or "all"),
                    selector=",".join(f"{k}={v}" for k, v in sorted(request.selector.items())),
                )
            return deployment
        except EdgefleetError as error:
            await abort_with(context, error)

    async def Undeploy(self, request, context):
        try:
            await self._deployments.undeploy(request.alias)
            if self._audit is not None:
                await self._audit(CALLER.get(), "model.undeploy", request.alias)
        except EdgefleetError as error:
            await abort_with(context, error)
        return models_pb2.UndeployResponse()

    async def ListDeployments(self, request, context):
        return models_pb2.ListDeploymentsResponse(models=self._deployments.placements())
