"""Fleet certificates: names, keys, CSRs, identities and gRPC credentials.

Every certificate in a fleet is issued by the fleet CA (``coordinator/pki.py``)
and names exactly one principal: a node or a coordinator replica. The name is
in two places, each with its use:

- a URI SAN ``edgefleet://<role>/<id>``: who the peer is, read by the
  receiving daemon to authorise a call (``identity_of``);
- a DNS SAN that a dialer checks as the target name: ``coordinator.edgefleet``
  for every replica, and a name derived from the node id for a node (node ids
  may hold characters a DNS name may not), so a coordinator that dials node X
  accepts only node X's certificate.

The CA is pinned by the SHA-256 of its DER encoding (``fingerprint``); a join
token carries a prefix of it. All cryptography is the ``cryptography``
package's; nothing here is hand-rolled.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.errors import Reason, error_of

NODE = "node"
COORDINATOR = "coordinator"
ROLES = (NODE, COORDINATOR)
COORDINATOR_DNS = "coordinator.edgefleet"
URI_SCHEME = "edgefleet://"


TOKEN_VERSION = "EF1"
PIN_HEX = 32  # 128 bits of the CA's SHA-256 in a join token


@dataclass(frozen=True)
class JoinToken:
    """``EF1.<ca-sha256 prefix>.<id>.<secret>``: the pin, the record, the secret."""

    pin: str
    token_id: str
    secret: str


MAX_TOKEN_CHARS = 256


def parse_token(token: str) -> JoinToken:
    parts = token.strip().split(".") if len(token) <= MAX_TOKEN_CHARS else []
    if (
        len(parts) != 4
        or parts[0] != TOKEN_VERSION
        or len(parts[1]) != PIN_HEX
        or not all(c in "0123456789abcdef" for c in parts[1])
        or not parts[2].isalnum()
        or not parts[3]
    ):
        raise error_of(
            Reason.TOKEN_MALFORMED,
            f"a join token looks like {TOKEN_VERSION}.<32 hex>.<id>.<secret>; this one does not",
        )
    return JoinToken(pin=parts[1], token_id=parts[2], secret=parts[3])


def format_token(ca_fingerprint: str, token_id: str, secret: str) -> str:
    return f"{TOKEN_VERSION}.{ca_fingerprint[:PIN_HEX]}.{token_id}.{secret}"


def pin_matches(pin: str, ca_fingerprint: str) -> bool:
    return hmac.compare_digest(pin, ca_fingerprint[:PIN_HEX])


def node_dns(node_id: str) -> str:
    """The DNS SAN of a node's certificate, and the target name its dialers check."""
    return f"n{hashlib.sha256(node_id.encode()).hexdigest()[:40]}.node.edgefleet"


def dns_name(role: str, principal_id: str) -> str:
    return COORDINATOR_DNS if role == COORDINATOR else node_dns(principal_id)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, hex: what a join token pins."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


def new_key() -> bytes:
    """A new private key (EC P-256), PEM, unencrypted (the state dir is 0700)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def csr_for(key_pem: bytes, role: str, principal_id: str) -> bytes:
    """A certificate signing request for ``role``/``principal_id``, signed by the key."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, principal_id[:64]),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


# Clocks on edge devices drift: a certificate is valid from a little before it is made.
BACKDATE_S = 300.0


def renew_at(cert_pem: bytes) -> float:
    """Unix time two thirds into a certificate's life (counted from its issue,
    not from its backdated start): when its holder asks for a new one."""
    identity = identity_of(cert_pem)
    issued = identity.not_before + BACKDATE_S
    return issued + max(0.0, identity.not_after - issued) * 2 / 3


@dataclass(frozen=True)
class Identity:
    """Who a certificate names, and until when."""

    role: str
    principal_id: str
    serial: int
    not_after: float  # unix time
    not_before: float

    @property
    def lifetime_s(self) -> float:
        return self.not_after - self.not_before


def _identity(cert: x509.Certificate) -> Identity | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.startswith(URI_SCHEME):
            continue
        role, _, principal_id = uri[len(URI_SCHEME) :].partition("/")
        if role in ROLES and principal_id:
            return Identity(
                role=role,
                principal_id=principal_id,
                serial=cert.serial_number,
                not_after=cert.not_valid_after_utc.timestamp(),
                not_before=cert.not_valid_before_utc.timestamp(),
            )
    return None


@functools.lru_cache(maxsize=4096)
def identity_of(cert_pem: bytes) -> Identity | None:
    """The principal a (verified) certificate names; None if it names none."""
    try:
        return _identity(x509.load_pem_x509_certificate(cert_pem))
    except ValueError:
        return None


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The verified client certificate's principal of a call (mTLS listeners only)."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or ()
    return identity_of(bytes(pems[0])) if pems else None


def expires_in(cert_pem: bytes, now: datetime.datetime | None = None) -> float:
    cert = x509.load_pem_x509_certificate(cert_pem)
    now = now or datetime.datetime.now(datetime.UTC)
    return (cert.not_valid_after_utc - now).total_seconds()


# --- gRPC credentials -----------------------------------------------------------------------
def channel_credentials(ca_pem: bytes, key_pem: bytes, cert_pem: bytes):
    """Client side of mutual TLS: trust only the fleet CA, present our certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def renewable_server_credentials(holder, *, require_client_auth: bool) -> grpc.ServerCredentials:
    """Server credentials that follow a renewed certificate at the next handshake.

    ``holder`` has ``key_pem``, ``chain_pem``, ``ca_pem`` and a ``generation``
    bumped on every renewal; open connections keep the certificate they began with.
    """
    seen = {"generation": holder.generation}

    def configuration():
        return grpc.ssl_server_certificate_configuration(
            [(holder.key_pem, holder.chain_pem)], root_certificates=holder.ca_pem
        )

    def fetch():
        if seen["generation"] == holder.generation:
            return None
        seen["generation"] = holder.generation
        return configuration()

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=require_client_auth
    )


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` listens on loopback only (an empty host counts)."""
    host = address.rpartition(":")[0].strip("[]") or "127.0.0.1"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_options(target_dns: str) -> list[tuple[str, str]]:
    """Check the server's certificate for ``target_dns`` whatever address we dial."""
    return [("grpc.ssl_target_name_override", target_dns)]


def is_ca(cert_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
