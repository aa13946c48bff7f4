"""AccessService over gRPC: a thin adapter over ``coordinator.access.Access``.

Which caller may call what is the guard's table (``CLIENT_POLICIES`` and
``NODE_POLICIES`` in ``coordinator.policies``); the caller arrives in
``auth.CALLER``.
"""

from __future__ import annotations

from coordinator.access import Access
from edgefleet.auth import CALLER
from edgefleet.errors import EdgefleetError, abort_with
from edgefleet.v1 import access_pb2, access_pb2_grpc

SERVICE_NAME = access_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    def __init__(self, access: Access) -> None:
        self._access = access

    async def _call(self, context, work):
        try:
            return await work
        except EdgefleetError as error:
            await abort_with(context, error)

    async def Join(self, request, context):
        return await self._call(context, self._access.join(request))

    async def NodeEndpoints(self, request, context):
        return access_pb2.NodeEndpointsResponse(node_endpoints=await self._access.endpoints())

    async def RenewCertificate(self, request, context):
        node_id = CALLER.get().principal_id
        certificate = await self._call(context, self._access.renew(node_id, request.csr_pem))
        return access_pb2.RenewCertificateResponse(certificate_pem=certificate)

    async def CreateJoinToken(self, request, context):
        return await self._call(context, self._access.create_token(CALLER.get(), request))

    async def ListJoinTokens(self, request, context):
        tokens = await self._call(context, self._access.list_tokens())
        return access_pb2.ListJoinTokensResponse(tokens=tokens)

    async def RevokeJoinToken(self, request, context):
        await self._call(context, self._access.revoke_token(CALLER.get(), request.token_id))
        return access_pb2.RevokeJoinTokenResponse()

    async def ListNodeIdentities(self, request, context):
        nodes = await self._call(context, self._access.list_identities())
        return access_pb2.ListNodeIdentitiesResponse(nodes=nodes)

    async def ApproveNode(self, request, context):
        return await self._call(context, self._access.approve(CALLER.get(), request.node_id))

    async def RevokeNode(self, request, context):
        return await self._call(context, self._access.revoke(CALLER.get(), request.node_id))

    async def CreateApiKey(self, request, context):
        return await self._call(
            context, self._access.create_key(CALLER.get(), request.name, list(request.scopes))
        )

    async def ListApiKeys(self, request, context):
        keys = await self._call(context, self._access.list_keys())
        return access_pb2.ListApiKeysResponse(keys=keys)

    async def RevokeApiKey(self, request, context):
        await self._call(context, self._access.revoke_key(CALLER.get(), request.key_id))
        return access_pb2.RevokeApiKeyResponse()

    async def ListAudit(self, request, context):
        entries = await self._call(context, self._access.list_audit(request.limit))
        return access_pb2.ListAuditResponse(entries=entries)
