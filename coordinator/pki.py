"""The fleet CA: created once, shared by every replica through etcd, sealed.

The first coordinator to start creates the CA (EC P-256, ten years) and
stores it in etcd: the certificate in the clear, the private key sealed with
a key derived (HKDF-SHA256) from the fleet secret that every replica is
given (``--fleet-secret-file``), so etcd alone never holds a usable CA key.
Creation is one transaction (create if absent), so two replicas starting at
once agree on one CA. An operator may bring their own CA instead
(``--tls-ca`` and ``--tls-ca-key``).

``issue`` signs a certificate for one principal (a node or a coordinator
replica) from a CSR whose signature it checks; the principal's name is the
coordinator's decision, never the CSR's.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.etcd import Compare, Etcd, Put
from coordinator.keys import Keys
from edgefleet import tls
from edgefleet.errors import Reason, error_of

CA_LIFETIME = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(seconds=tls.BACKDATE_S)


def new_fleet_secret() -> str:
    return secrets.token_urlsafe(32)


def _sealer(fleet_secret: str) -> Fernet:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"edgefleet fleet CA key v1"
    ).derive(fleet_secret.encode())
    return Fernet(base64.urlsafe_b64encode(key))


@dataclass(frozen=True)
class FleetCA:
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> str:
        return tls.fingerprint(self.cert_pem)

    @property
    def _cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @classmethod
    def generate(cls, fleet_name: str = "edgefleet") -> FleetCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{fleet_name} fleet CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert.public_bytes(serialization.Encoding.PEM), key)

    @classmethod
    def from_files(cls, cert_pem: bytes, key_pem: bytes) -> FleetCA:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key must be an EC key")
        cert = x509.load_pem_x509_certificate(cert_pem)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ValueError("the CA key does not match the CA certificate")
        return cls(cert_pem, key)

    # --- sealed storage --------------------------------------------------------------
    def sealed(self, fleet_secret: str) -> bytes:
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        record = {
            "cert_pem": self.cert_pem.decode(),
            "sealed_key": _sealer(fleet_secret).encrypt(key_pem).decode(),
        }
        return json.dumps(record).encode()

    @classmethod
    def unsealed(cls, blob: bytes, fleet_secret: str) -> FleetCA:
        record = json.loads(blob)
        try:
            key_pem = _sealer(fleet_secret).decrypt(record["sealed_key"].encode())
        except InvalidToken:
            raise ValueError(
                "the fleet secret does not open the CA stored in etcd: give this replica "
                "the fleet secret file of the coordinator that created the fleet"
            ) from None
        return cls.from_files(record["cert_pem"].encode(), key_pem)

    # --- issuing ---------------------------------------------------------------------
    def issue(
        self,
        csr_pem: bytes,
        *,
        role: str,
        principal_id: str,
        ttl_s: float,
        hosts: tuple[str, ...] = (),
    ) -> bytes:
        """A certificate for ``role``/``principal_id`` on the CSR's key.

        ``hosts``: extra names or IP addresses the holder serves on (a
        coordinator's listen addresses, so plain HTTPS clients can check them).
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise error_of(Reason.BAD_CSR, "the certificate request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise error_of(Reason.BAD_CSR, "the certificate request's signature is invalid")
        if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
            raise error_of(Reason.BAD_CSR, "the certificate request must carry an EC key")
        named = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if named != [principal_id[:64]]:
            raise error_of(
                Reason.BAD_CSR,
                f"the certificate request names {named[0] if named else 'no one'!r}, "
                f"not {principal_id!r}",
            )
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"{tls.URI_SCHEME}{role}/{principal_id}"),
            x509.DNSName(tls.dns_name(role, principal_id)),
        ]
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if host:
                    names.append(x509.DNSName(host))
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                        x509.NameAttribute(NameOID.COMMON_NAME, principal_id[:64]),
                    ]
                )
            )
            .issuer_name(self._cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(seconds=ttl_s))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


async def load_or_create(etcd: Etcd, keys: Keys, fleet_secret: str) -> FleetCA:
    """The fleet's CA from etcd; created (once, by whichever replica is first) if absent."""
    stored = await etcd.get(keys.ca)
    if stored is None:
        candidate = FleetCA.generate()
        created, _ = await etcd.txn(
            [Compare(keys.ca, mod_revision=0)], [Put(keys.ca, candidate.sealed(fleet_secret))]
        )
        if created:
            return candidate
        stored = await etcd.get(keys.ca)  # another replica won the race: use its CA
        if stored is None:
            raise error_of(Reason.ETCD_UNAVAILABLE, "the fleet CA vanished from etcd")
    return FleetCA.unsealed(stored.value, fleet_secret)
