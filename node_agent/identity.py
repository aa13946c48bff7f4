"""The node's fleet identity: join once with a token, then keep and renew it.

Join (``join``), as k3s and kubelet do it:

1. read the coordinator's certificate chain from a TLS handshake, and check
   the CA in it against the pin in the token: a coordinator that is not the
   fleet's never sees the token (the node stops with CA_PIN_MISMATCH);
2. make a key here (it never leaves the device) and a CSR for it;
3. send token and CSR over TLS to the pinned CA; get the node certificate.

The identity (node id, key, certificate, CA, the node listeners to register
with) is kept in the state dir (0700), so a restart rejoins with no token.
The certificate is renewed at two thirds of its life (``keep_renewed``);
listeners and channels take the new one for new connections, and open ones
keep theirs, so no stream drops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from OpenSSL import SSL, crypto

from edgefleet import tls
from edgefleet.errors import Reason, error_of
from edgefleet.profile import write_private
from edgefleet.v1 import access_pb2, access_pb2_grpc

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"


@dataclass
class NodeCredentials:
    node_id: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    node_endpoints: list[str] = field(default_factory=list)
    # Labels the join token gave the node (site, role, ...): sent when it registers.
    labels: dict[str, str] = field(default_factory=dict)
    state_dir: Path | None = None
    generation: int = 0

    # --- the state dir -----------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: Path) -> NodeCredentials | None:
        path = state_dir / IDENTITY_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            node_id=data["node_id"],
            key_pem=(state_dir / "node.key").read_bytes(),
            cert_pem=(state_dir / "node.crt").read_bytes(),
            ca_pem=(state_dir / "ca.crt").read_bytes(),
            node_endpoints=list(data.get("node_endpoints", [])),
            labels=dict(data.get("labels", {})),
            state_dir=state_dir,
        )

    def save(self) -> None:
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.state_dir / "node.key", self.key_pem)
        write_private(self.state_dir / "node.crt", self.cert_pem)
        write_private(self.state_dir / "ca.crt", self.ca_pem)
        record = {
            "node_id": self.node_id,
            "node_endpoints": self.node_endpoints,
            "labels": self.labels,
        }
        write_private(self.state_dir / IDENTITY_FILE, json.dumps(record, indent=2).encode())

    def remember_endpoints(self, endpoints) -> None:
        endpoints = sorted(set(endpoints))
        if endpoints and endpoints != self.node_endpoints:
            self.node_endpoints = endpoints
            if self.state_dir is not None:
                self.save()

    # --- gRPC credentials --------------------------------------------------------------
    @property
    def chain_pem(self) -> bytes:
        return self.cert_pem

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: only fleet certificates connect; a renewal applies to new handshakes."""
        return tls.renewable_server_credentials(self, require_client_auth=True)

    def channel(self, address: str) -> grpc.aio.Channel:
        """Mutual TLS to a coordinator's node listener."""
        return grpc.aio.secure_channel(
            address,
            tls.channel_credentials(self.ca_pem, self.key_pem, self.cert_pem),
            options=tls.channel_options(tls.COORDINATOR_DNS),
        )

    def peer_channel(self, address: str, node_id: str) -> grpc.aio.Channel:
        """Mutual TLS to another node (model files), its own name checked."""
        return grpc.aio.secure_channel(
            address,
            tls.channel_credentials(self.ca_pem, self.key_pem, self.cert_pem),
            options=tls.channel_options(tls.node_dns(node_id)),
        )

    def client_channel(self, address: str) -> grpc.aio.Channel:
        """TLS (server checked against the fleet CA) to a coordinator's client port."""
        return grpc.aio.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=self.ca_pem),
            options=tls.channel_options(tls.COORDINATOR_DNS),
        )

    def renew_at(self) -> float:
        return tls.renew_at(self.cert_pem)


# --- join ---------------------------------------------------------------------------------
def presented_ca(address: str, timeout_s: float = 5.0) -> bytes:
    """The CA certificate (PEM) a coordinator presents in its TLS chain, unverified.

    Nothing is sent but a TLS hello: the caller checks the result against its
    pin before it trusts or tells this peer anything.
    """
    host, _, port = address.rpartition(":")
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    context.set_alpn_protos([b"h2"])
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as raw:
        raw.setblocking(False)
        connection = SSL.Connection(context, raw)
        connection.set_connect_state()
        connection.set_tlsext_host_name(tls.COORDINATOR_DNS.encode())
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                connection.do_handshake()
                break
            except (SSL.WantReadError, SSL.WantWriteError):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(f"no TLS handshake with {address} in {timeout_s:g}s") from None
                select.select([raw], [], [], min(left, 0.1))
            except SSL.Error as error:
                raise OSError(f"TLS handshake with {address} failed: {error}") from None
        chain = connection.get_peer_cert_chain() or []
    for certificate in chain[1:] or chain:
        pem = crypto.dump_certificate(crypto.FILETYPE_PEM, certificate)
        if tls.is_ca(pem):
            return pem
    raise OSError("the coordinator presented no CA certificate in its TLS chain")


async def join(
    token: str, coordinators: list[str], node_id: str, state_dir: Path
) -> NodeCredentials:
    """Join the fleet with ``token`` through the first coordinator that answers."""
    parsed = tls.parse_token(token)
    last: Exception | None = None
    for address in coordinators:
        try:
            ca_pem = await asyncio.to_thread(presented_ca, address)
        except OSError as error:
            last = error
            log.warning("coordinator %s: cannot read its certificate chain (%s)", address, error)
            continue
        if not tls.pin_matches(parsed.pin, tls.fingerprint(ca_pem)):
            raise error_of(
                Reason.CA_PIN_MISMATCH,
                f"the coordinator at {address} presents CA {tls.fingerprint(ca_pem)[:32]}, "
                f"not the CA pinned in the token ({parsed.pin}): the token was not sent. "
                "Check the address, or create a token on this fleet's coordinator",
            )
        key_pem = tls.new_key()
        request = access_pb2.JoinRequest(
            token=token, csr_pem=tls.csr_for(key_pem, tls.NODE, node_id), node_id=node_id
        )
        credentials = NodeCredentials(node_id, key_pem, b"", ca_pem, state_dir=state_dir)
        try:
            async with credentials.client_channel(address) as channel:
                reply = await access_pb2_grpc.AccessServiceStub(channel).Join(request, timeout=15)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                last = error
                continue
            raise
        credentials.node_id = reply.node_id
        credentials.cert_pem = reply.certificate_pem
        credentials.node_endpoints = sorted(reply.node_endpoints)
        credentials.labels = dict(reply.labels)
        credentials.save()
        state = "pending approval" if reply.pending else "approved"
        log.info("joined the fleet as %s (%s); identity in %s", reply.node_id, state, state_dir)
        return credentials
    raise OSError(f"no coordinator answered the join ({last})")


async def discover_endpoints(credentials: NodeCredentials, coordinators: list[str]) -> list[str]:
    """The node listeners, asked of the coordinators' client ports (TLS, fleet CA)."""
    for address in coordinators:
        try:
            async with credentials.client_channel(address) as channel:
                reply = await access_pb2_grpc.AccessServiceStub(channel).NodeEndpoints(
                    access_pb2.NodeEndpointsRequest(), timeout=5
                )
            if reply.node_endpoints:
                credentials.remember_endpoints(reply.node_endpoints)
                return list(reply.node_endpoints)
        except grpc.aio.AioRpcError as error:
            log.warning("coordinator %s: %s", address, error.details())
    return list(credentials.node_endpoints)


async def keep_renewed(credentials: NodeCredentials, endpoints) -> None:
    """Renew the certificate at two thirds of its life, forever (retrying on failure)."""
    while True:
        await asyncio.sleep(max(1.0, credentials.renew_at() - time.time()))
        key_pem = credentials.key_pem
        csr = tls.csr_for(key_pem, tls.NODE, credentials.node_id)
        for address in endpoints() or credentials.node_endpoints:
            try:
                async with credentials.channel(address) as channel:
                    reply = await access_pb2_grpc.AccessServiceStub(channel).RenewCertificate(
                        access_pb2.RenewCertificateRequest(csr_pem=csr), timeout=10
                    )
            except grpc.aio.AioRpcError as error:
                log.warning("renewal through %s failed: %s", address, error.details())
                continue
            credentials.cert_pem = reply.certificate_pem
            credentials.generation += 1
            if credentials.state_dir is not None:
                credentials.save()
            log.info(
                "renewed this node's certificate (valid until %s)",
                time.ctime(tls.identity_of(reply.certificate_pem).not_after),
            )
            break
        else:
            await asyncio.sleep(5.0)
