"""The coordinator's side of the trust model, set up once at start.

- the fleet CA (from etcd, sealed with the fleet secret; or operator files);
- this replica's own certificate (role coordinator), issued by itself from
  the CA and renewed at two thirds of its life; the listeners take new
  handshakes with the new one, open connections keep theirs;
- the gRPC credentials: the client listener (TLS, API keys in metadata), the
  node listener (mutual TLS, node certificates only) and the channels to
  nodes (mutual TLS, the node's own name checked);
- who a call comes from (``authenticate_client``, ``authenticate_node``),
  which the guard's policy tables (``CLIENT_POLICIES``, ``NODE_POLICIES``)
  use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coordinator.access import Access
from coordinator.etcd import Etcd
from coordinator.keys import Keys
from coordinator.pki import FleetCA, load_or_create, new_fleet_secret
from edgefleet import auth, tls
from edgefleet.auth import ADMIN, FLEET, INFERENCE, NODE, NOT_HERE, PUBLIC, Principal
from edgefleet.profile import Profile, write_private

log = logging.getLogger(__name__)

NODES_REGISTER_ELSEWHERE = (
    "nodes register on the coordinator's node listener with a fleet certificate "
    "(start the node with --join TOKEN)"
)

# Every RPC of each service, per listener: who may call it.
CLIENT_POLICIES = {
    "edgefleet.v1.CoordinatorService": {
        "Register": NOT_HERE,
        "Heartbeat": NOT_HERE,
        "Deregister": NOT_HERE,
        "CreateSession": INFERENCE,
        "Chat": INFERENCE,
        "GetSession": INFERENCE,
        "CloseSession": INFERENCE,
        "Complete": INFERENCE,
        "FleetStatus": INFERENCE,  # addresses, pids and labels for admin keys only
        "DrainNode": ADMIN,
        "ListModels": INFERENCE,
    },
    "edgefleet.v1.AccessService": {
        "Join": PUBLIC,  # the join token is the credential; Access.join checks it
        "NodeEndpoints": PUBLIC,  # addresses only; nodes check the listener's certificate
        "RenewCertificate": NOT_HERE,
        "CreateJoinToken": ADMIN,
        "ListJoinTokens": ADMIN,
        "RevokeJoinToken": ADMIN,
        "ListNodeIdentities": ADMIN,
        "ApproveNode": ADMIN,
        "RevokeNode": ADMIN,
        "CreateApiKey": ADMIN,
        "ListApiKeys": ADMIN,
        "RevokeApiKey": ADMIN,
        "ListAudit": ADMIN,
    },
    "edgefleet.v1.ModelService": {
        "AddModel": ADMIN,
        "ListRegistry": INFERENCE,
        "RemoveModel": ADMIN,
        "FetchModel": NOT_HERE,  # nodes fetch on the node listener
        "Deploy": ADMIN,
        "Undeploy": ADMIN,
        "ListDeployments": ADMIN,  # node ids, labels and nodes' errors
    },
}
NODE_POLICIES = {
    "edgefleet.v1.CoordinatorService": {
        name: (NODE if name in ("Register", "Heartbeat", "Deregister") else NOT_HERE)
        for name in CLIENT_POLICIES["edgefleet.v1.CoordinatorService"]
    },
    "edgefleet.v1.AccessService": {
        name: (NODE if name == "RenewCertificate" else NOT_HERE)
        for name in CLIENT_POLICIES["edgefleet.v1.AccessService"]
    },
    "edgefleet.v1.ModelService": {
        # Nodes fetch model files; so do other coordinator replicas (replica_files).
        name: (FLEET if name == "FetchModel" else NOT_HERE)
        for name in CLIENT_POLICIES["edgefleet.v1.ModelService"]
    },
}


@dataclass
class OwnCertificate:
    """A daemon's key and current certificate; renewed in place."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    # Bumped on renewal; the credential fetchers and channel pools follow it.
    generation: int = 0
    listeners: list = field(default_factory=list)

    @property
    def chain_pem(self) -> bytes:
        """Leaf then CA: a joining node reads the CA from the handshake to check its pin."""
        return self.cert_pem + self.ca_pem

    def server_credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        return tls.renewable_server_credentials(self, require_client_auth=require_client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return tls.channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def replace(self, cert_pem: bytes) -> None:
        self.cert_pem = cert_pem
        self.generation += 1
        for listener in self.listeners:
            listener()

    def renew_at(self) -> float:
        """Unix time at two thirds of the certificate's life."""
        return tls.renew_at(self.cert_pem)


class FleetSecretMissing(Exception):
    pass


def _fleet_secret(path: Path, *, may_create: bool) -> str:
    if path.exists():
        return path.read_text().strip()
    if not may_create:
        raise FleetSecretMissing(
            f"this fleet's CA is already in etcd, sealed with the fleet secret, and {path} "
            "does not exist: copy the fleet secret file from the coordinator that created "
            "the fleet (--fleet-secret-file)"
        )
    secret = new_fleet_secret()
    write_private(path, secret.encode())
    log.info("created the fleet secret %s (give it to every coordinator replica)", path)
    return secret


async def load_ca(
    etcd: Etcd,
    keys: Keys,
    *,
    secret_file: Path,
    ca_file: str = "",
    ca_key_file: str = "",
) -> FleetCA:
    """The fleet CA: the operator's files, else etcd's (created on first start)."""
    if ca_file or ca_key_file:
        return FleetCA.from_files(Path(ca_file).read_bytes(), Path(ca_key_file).read_bytes())
    exists = await etcd.get(keys.ca) is not None
    secret = _fleet_secret(secret_file, may_create=not exists)
    return await load_or_create(etcd, keys, secret)


def own_certificate(
    ca: FleetCA, coordinator_id: str, hosts: tuple[str, ...], ttl_s: float
) -> OwnCertificate:
    key = tls.new_key()
    cert = ca.issue(
        tls.csr_for(key, tls.COORDINATOR, coordinator_id),
        role=tls.COORDINATOR,
        principal_id=coordinator_id,
        ttl_s=ttl_s,
        hosts=hosts,
    )
    return OwnCertificate(key, cert, ca.cert_pem)


async def keep_renewed(own: OwnCertificate, ca: FleetCA, coordinator_id: str, hosts, ttl_s):
    """Renew this replica's certificate at two thirds of its life, forever."""
    while True:
        await asyncio.sleep(max(1.0, own.renew_at() - time.time()))
        fresh = ca.issue(
            tls.csr_for(own.key_pem, tls.COORDINATOR, coordinator_id),
            role=tls.COORDINATOR,
            principal_id=coordinator_id,
            ttl_s=ttl_s,
            hosts=hosts,
        )
        own.replace(fresh)
        log.info("renewed this coordinator's certificate (valid %.0fs)", ttl_s)


def client_authenticator(access: Access, static_keys: frozenset[str]):
    """The caller on the client listener: an API key from the call metadata."""

    async def authenticate(context) -> Principal | None:
        key = auth.bearer(context.invocation_metadata())
        if not key:
            return None
        return auth.static_key_principal(key, static_keys) or await access.key_principal(key)

    return authenticate


def node_authenticator(access: Access):
    """The caller on the node listener: the node its verified certificate names."""

    async def authenticate(context) -> Principal | None:
        return await access.node_principal(tls.peer_identity(context))

    return authenticate


async def write_admin_profile(
    access: Access, path: Path, *, coordinator_id: str, grpc_address: str, http_url: str
) -> None:
    """An admin profile for this fleet in the state dir, if there is none yet."""
    if path.exists():
        return
    created = await access.create_key(
        Principal("coordinator", coordinator_id, coordinator_id),
        f"admin (created by {coordinator_id})",
        [ADMIN, INFERENCE],
    )
    Profile(
        coordinators=[grpc_address],
        http=http_url,
        ca_pem=access.ca.cert_pem.decode(),
        api_key=created.key,
        written_by=f"coordinator {coordinator_id}",
    ).save(path)
    log.info("wrote an admin profile (CA, admin API key, addresses) to %s", path)


# --- posture -------------------------------------------------------------------------------
def posture_problems(config) -> list[str]:
    """Why this coordinator must not start as configured (empty: it may).

    Secure by default: gRPC is always TLS and keyed unless --insecure; HTTP
    off loopback needs TLS, and keys (keyless HTTP is for loopback only).
    """
    if config.insecure:
        return []
    problems = []
    http_on = config.http and config.http != "off"
    if http_on and not tls.is_loopback(config.http):
        if not (config.tls_auto or config.tls_cert):
            problems.append(
                f"HTTP on {config.http} is not loopback: serve it over TLS (--tls-auto for a "
                "certificate from the fleet CA, or --tls-cert/--tls-key), or start with "
                "--insecure to accept plaintext on the network"
            )
    if bool(config.tls_cert) != bool(config.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if bool(config.tls_ca) != bool(config.tls_ca_key):
        problems.append("--tls-ca and --tls-ca-key go together")
    return problems


def node_listen_address(config) -> str:
    if config.node_grpc:
        return config.node_grpc
    host, _, port = config.grpc.rpartition(":")
    return f"{host}:{int(port) + 1 if int(port) else 0}"


def certificate_hosts(*addresses: str) -> tuple[str, ...]:
    """Names and IPs a replica's certificate carries for its listen addresses."""
    import socket

    hosts = {"localhost", "127.0.0.1", socket.gethostname()}
    for address in addresses:
        host = address.rpartition(":")[0].strip("[]")
        if host and host not in ("0.0.0.0", "::"):
            hosts.add(host)
    return tuple(sorted(hosts))


def write_http_tls_files(own: OwnCertificate, state_dir: Path) -> tuple[str, str]:
    """The replica's certificate as files for the HTTP server (--tls-auto)."""
    directory = state_dir / "http-tls"
    write_private(directory / "cert.pem", own.chain_pem)
    write_private(directory / "key.pem", own.key_pem)
    return str(directory / "cert.pem"), str(directory / "key.pem")
