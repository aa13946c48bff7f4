"""Who may be in the fleet and who may call it, kept in etcd.

- **Join tokens** ``EF1.<ca-sha256 prefix>.<id>.<secret>``: the prefix pins the
  fleet CA (a node checks it before it sends the token), the id names the
  record, and only the secret's SHA-256 is stored, under a lease for the
  token's TTL. Each join spends one use in the same transaction that writes
  the node's identity.
- **Node identities**: one record per node id with the serial of its current
  certificate (and the one before, while a renewed node still holds open
  connections with it), approval and revocation. A node's certificate is
  accepted only while its serial is one of those two and the id is not
  revoked.
- **API keys** ``efk_<id>_<secret>`` with scopes ``inference``/``admin``,
  stored hashed, compared in constant time.
- **Audit**: one JSON record per admin action, under a lease for the
  retention time, and the same line in the log.

Identities and keys are mirrored in memory from a watch (``run``), so a call
is checked without a round trip to etcd; a record the mirror has not seen yet
(written a moment ago through another replica) is read from etcd.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from coordinator.etcd import Compare, Delete, Etcd, KeyedRecords, KeyValue, Put
from coordinator.keys import Keys
from coordinator.pki import FleetCA
from edgefleet import auth, tls
from edgefleet.auth import Principal
from edgefleet.errors import Reason, error_of
from edgefleet.tls import format_token, parse_token, pin_matches
from edgefleet.v1 import access_pb2

log = logging.getLogger(__name__)
audit_log = logging.getLogger("edgefleet.audit")

KEY_PREFIX = "efk"
DEFAULT_TOKEN_TTL_S = 3600.0
MAX_TOKEN_TTL_S = 365 * 86400.0
MAX_LABELS = 32
MAX_NAME = 128
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is well under 1 KiB
JOIN_ATTEMPTS = 16  # compare-and-swap retries when joins race on one token
MAX_AUDIT_ENTRIES = 1000


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_api_key(key: str) -> tuple[str, str] | None:
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not key_id.isalnum() or not secret:
        return None
    return key_id, secret


def _token_info(token_id: str, record: dict) -> access_pb2.JoinToken:
    """What operators see of a stored token: everything but its secret's hash."""
    shown = {k: v for k, v in record.items() if k != "secret_sha256"}
    return access_pb2.JoinToken(token_id=token_id, **shown)


def _key_info(key_id: str, record: dict) -> access_pb2.ApiKey:
    """What operators see of a stored API key: everything but its secret's hash."""
    shown = {k: v for k, v in record.items() if k != "secret_sha256"}
    return access_pb2.ApiKey(key_id=key_id, **shown)


def _check_labels(labels) -> dict[str, str]:
    labels = dict(labels)
    if len(labels) > MAX_LABELS or any(
        not k or len(k) > MAX_NAME or len(v) > MAX_NAME for k, v in labels.items()
    ):
        raise error_of(
            Reason.INVALID_REQUEST,
            f"labels: at most {MAX_LABELS}, keys non-empty, keys and values "
            f"at most {MAX_NAME} characters",
        )
    return labels


class Access:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        ca: FleetCA,
        *,
        cert_ttl_s: float = 86400.0,
        audit_retention_s: float = 30 * 86400.0,
        node_endpoints: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> None:
        self._etcd = etcd
        self._keys = keys
        self.ca = ca
        self.cert_ttl_s = cert_ttl_s
        self.audit_retention_s = audit_retention_s
        self.node_endpoints = node_endpoints
        self._identities = KeyedRecords(
            access_pb2.NodeIdentity.FromString,
            what="node identity",
            changed=self._identity_changed,
            fail_closed=True,
        )
        self.identities: dict[str, access_pb2.NodeIdentity] = self._identities.items
        self._keys_mirror = KeyedRecords(json.loads, what="API key", fail_closed=True)
        self._api_keys: dict[str, dict] = self._keys_mirror.items
        self.synced = asyncio.Event()
        # Called with a node id when its identity is revoked (on every replica).
        self._on_revoked: list[Callable[[str], None]] = []

    async def endpoints(self) -> list[str]:
        return await self.node_endpoints() if self.node_endpoints else []

    def on_revoked(self, callback: Callable[[str], None]) -> None:
        self._on_revoked.append(callback)

    # --- the mirror --------------------------------------------------------------------
    async def run(self) -> None:
        """Mirror identities and API keys until cancelled (get, then watch)."""
        await self._etcd.mirror(
            {
                self._keys.identities: self._identities.handlers,
                # A key revoked while the watch was down must not stay usable here.
                self._keys.api_keys: self._keys_mirror.handlers,
            },
            self.synced,
        )

    def _identity_changed(self, node_id, before, after) -> None:
        if after is not None and after.revoked and (before is None or not before.revoked):
            for callback in self._on_revoked:
                callback(node_id)

    # --- nodes: who is one -------------------------------------------------------------
    async def identity(self, node_id: str) -> access_pb2.NodeIdentity | None:
        identity = self.identities.get(node_id)
        if identity is None:  # joined a moment ago through another replica?
            kv = await self._etcd.get(self._keys.identity(node_id))
            if kv is not None:
                identity = access_pb2.NodeIdentity.FromString(kv.value)
        return identity

    async def node_principal(self, peer: tls.Identity | None) -> Principal | None:
        """The node (or coordinator replica) a verified peer certificate speaks
        for; None if it may not speak. Only coordinators hold the fleet CA's
        key, so a certificate with the coordinator role is one of them; the
        policy tables let it call nothing on this listener but FetchModel."""
        if peer is not None and peer.role == tls.COORDINATOR:
            return Principal("coordinator", peer.principal_id, peer.principal_id)
        if peer is None or peer.role != tls.NODE:
            return None
        identity = await self.identity(peer.principal_id)
        if identity is None or identity.revoked:
            return None
        if format(peer.serial, "x") not in (identity.serial, identity.previous_serial):
            return None  # an older certificate of this id (revoked, then joined again)
        return Principal("node", peer.principal_id, peer.principal_id)

    async def check_may_register(self, node_id: str) -> dict[str, str]:
        """The labels a node registers with (its join token's), if it may register."""
        identity = await self.identity(node_id)
        if identity is None or identity.revoked:
            raise error_of(Reason.NODE_REVOKED, f"node {node_id}'s identity was revoked")
        if not identity.approved:
            raise error_of(
                Reason.NODE_PENDING,
                f"node {node_id} waits for approval: run `edgefleet node approve {node_id}`",
            )
        return dict(identity.labels)

    # --- join and renewal ----------------------------------------------------------------
    async def join(self, request: access_pb2.JoinRequest) -> access_pb2.JoinResponse:
        from coordinator.membership import NODE_ID

        parsed = parse_token(request.token)
        if len(request.csr_pem) > MAX_CSR_BYTES:
            raise error_of(Reason.BAD_CSR, f"a CSR is at most {MAX_CSR_BYTES} bytes")
        if not pin_matches(parsed.pin, self.ca.fingerprint):
            raise error_of(Reason.TOKEN_UNKNOWN, "the join token was made for another fleet's CA")
        if not NODE_ID.match(request.node_id):
            raise error_of(
                Reason.INVALID_REQUEST,
                "node_id: 1-128 of letters, digits, '.', '_' and '-', starting with a "
                f"letter or digit; got {request.node_id[:64]!r}",
            )
        # Joins racing on one token (a fleet brought up at once) each re-read it and
        # retry: the token's use count is a compare-and-swap, not a lock.
        for _ in range(JOIN_ATTEMPTS):
            joined = await self._try_join(parsed, request)
            if joined is not None:
                break
        else:
            raise error_of(
                Reason.ACCESS_CONFLICT, "concurrent joins kept changing the token; retry"
            )
        identity, certificate, record = joined
        await self.audit(
            Principal("node", request.node_id, request.node_id),
            "node.join",
            request.node_id,
            token=parsed.token_id,
            approved=str(identity.approved).lower(),
        )
        return access_pb2.JoinResponse(
            node_id=request.node_id,
            certificate_pem=certificate,
            ca_pem=self.ca.cert_pem,
            pending=not identity.approved,
            labels=record["labels"],
            node_endpoints=await self.endpoints(),
        )

    async def _live_token(self, parsed) -> tuple[KeyValue, dict]:
        """A token's stored record, if it may still be used: the right secret, not
        expired, uses left."""
        kv = await self._etcd.get(self._keys.token(parsed.token_id))
        if kv is None:
            raise error_of(Reason.TOKEN_UNKNOWN, "the join token is unknown, revoked or expired")
        record = json.loads(kv.value)
        if not hmac.compare_digest(record["secret_sha256"], _hash(parsed.secret)):
            raise error_of(Reason.TOKEN_UNKNOWN, "the join token is unknown, revoked or expired")
        if record["expires_at"] and time.time() >= record["expires_at"]:
            raise error_of(Reason.TOKEN_EXPIRED, "the join token has expired")
        if not record["unlimited"] and record["uses_left"] <= 0:
            raise error_of(Reason.TOKEN_USED_UP, "the join token has no uses left")
        return kv, record

    async def check_token(self, token: str) -> str:
        """Validate a join token without spending a use (a device downloading the
        installer before it joins); its id."""
        parsed = parse_token(token)
        if not pin_matches(parsed.pin, self.ca.fingerprint):
            raise error_of(Reason.TOKEN_UNKNOWN, "the join token was made for another fleet's CA")
        await self._live_token(parsed)
        return parsed.token_id

    async def _try_join(self, parsed, request):
        """One attempt: (identity, certificate, token record), or None if a concurrent
        join changed the token or the id between the read and the write."""
        token_key = self._keys.token(parsed.token_id)
        kv, record = await self._live_token(parsed)
        identity_key = self._keys.identity(request.node_id)
        existing = await self._etcd.get(identity_key)
        if existing is not None and not access_pb2.NodeIdentity.FromString(existing.value).revoked:
            raise error_of(
                Reason.NODE_ID_TAKEN,
                f"node id {request.node_id!r} already joined the fleet. A device keeps its "
                "identity in its state dir and rejoins without a token; to give this id to a "
                f"new device, run `edgefleet node revoke {request.node_id}` first",
            )
        certificate = self.ca.issue(
            request.csr_pem, role=tls.NODE, principal_id=request.node_id, ttl_s=self.cert_ttl_s
        )
        issued = tls.identity_of(certificate)
        identity = access_pb2.NodeIdentity(
            node_id=request.node_id,
            approved=record["approve"],
            serial=format(issued.serial, "x"),
            not_after=issued.not_after,
            joined_at=time.time(),
            token_id=parsed.token_id,
            labels=record["labels"],
        )
        operations: list[Put | Delete] = [Put(identity_key, identity.SerializeToString())]
        if not record["unlimited"]:
            record["uses_left"] -= 1
            operations.append(Put(token_key, json.dumps(record).encode(), lease=kv.lease))
        joined, _ = await self._etcd.txn(
            [
                Compare(token_key, mod_revision=kv.mod_revision),
                Compare(identity_key, mod_revision=existing.mod_revision if existing else 0),
            ],
            operations,
        )
        if not joined:  # another join spent the token or took the id meanwhile
            return None
        return identity, certificate, record

    async def renew(self, node_id: str, csr_pem: bytes) -> bytes:
        """A new certificate for a node (its own id), rotating the accepted serials."""
        if len(csr_pem) > MAX_CSR_BYTES:
            raise error_of(Reason.BAD_CSR, f"a CSR is at most {MAX_CSR_BYTES} bytes")
        issued: list[bytes] = []

        def rotate(identity):
            if identity.revoked:
                raise error_of(Reason.NODE_REVOKED, f"node {node_id}'s identity was revoked")
            certificate = self.ca.issue(
                csr_pem, role=tls.NODE, principal_id=node_id, ttl_s=self.cert_ttl_s
            )
            named = tls.identity_of(certificate)
            identity.previous_serial = identity.serial
            identity.serial = format(named.serial, "x")
            identity.not_after = named.not_after
            issued[:] = [certificate]

        identity = await self._update_identity(node_id, rotate, missing=Reason.NODE_REVOKED)
        log.info("renewed node %s's certificate (serial %s)", node_id, identity.serial)
        return issued[0]

    # --- operators: tokens -------------------------------------------------------------
    async def create_token(
        self, caller: Principal, request: access_pb2.CreateJoinTokenRequest
    ) -> access_pb2.CreateJoinTokenResponse:
        ttl = request.ttl_seconds or DEFAULT_TOKEN_TTL_S
        if not 1 <= ttl <= MAX_TOKEN_TTL_S or request.uses < 0:
            raise error_of(
                Reason.INVALID_REQUEST,
                f"ttl_seconds must be in [1, {MAX_TOKEN_TTL_S:.0f}] and uses >= 0",
            )
        labels = _check_labels(request.labels)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(24)
        now = time.time()
        record = {
            "secret_sha256": _hash(secret),
            "created_at": now,
            "expires_at": now + ttl,
            "uses_left": request.uses,
            "unlimited": request.uses == 0,
            "labels": labels,
            "approve": request.approve,
            "created_by": caller.who,
        }
        info = _token_info(token_id, record)
        lease = await self._etcd.grant(ttl)
        await self._etcd.put(self._keys.token(token_id), json.dumps(record).encode(), lease=lease)
        await self.audit(caller, "token.create", token_id, ttl_s=f"{ttl:g}", uses=str(request.uses))
        return access_pb2.CreateJoinTokenResponse(
            token=format_token(self.ca.fingerprint, token_id, secret), info=info
        )

    async def list_tokens(self) -> list[access_pb2.JoinToken]:
        kvs, _ = await self._etcd.get_prefix(self._keys.tokens)
        tokens = [_token_info(Keys.last_segment(kv.key), json.loads(kv.value)) for kv in kvs]
        return sorted(tokens, key=lambda t: t.created_at)

    async def revoke_token(self, caller: Principal, token_id: str) -> None:
        if not token_id or not await self._etcd.delete(self._keys.token(token_id)):
            raise error_of(Reason.ACCESS_NOT_FOUND, f"no join token {token_id!r}")
        await self.audit(caller, "token.revoke", token_id)

    # --- operators: nodes --------------------------------------------------------------
    async def list_identities(self) -> list[access_pb2.NodeIdentity]:
        kvs, _ = await self._etcd.get_prefix(self._keys.identities)
        return [access_pb2.NodeIdentity.FromString(kv.value) for kv in kvs]

    async def _update_identity(
        self, node_id: str, change, *, missing: Reason = Reason.ACCESS_NOT_FOUND
    ) -> access_pb2.NodeIdentity:
        """Read, ``change`` and write back a node's identity, retried while it races."""
        key = self._keys.identity(node_id)
        for _ in range(5):
            kv = await self._etcd.get(key) if node_id else None
            if kv is None:
                raise error_of(missing, f"no node identity {node_id!r}")
            identity = access_pb2.NodeIdentity.FromString(kv.value)
            change(identity)
            done, _ = await self._etcd.txn(
                [Compare(key, mod_revision=kv.mod_revision)],
                [Put(key, identity.SerializeToString())],
            )
            if done:
                return identity
        raise error_of(Reason.ACCESS_CONFLICT, f"node {node_id}'s identity kept changing; retry")

    async def approve(self, caller: Principal, node_id: str) -> access_pb2.NodeIdentity:
        def approve(identity):
            if identity.revoked:
                raise error_of(Reason.NODE_REVOKED, f"node {node_id} was revoked; it may rejoin")
            identity.approved = True

        identity = await self._update_identity(node_id, approve)
        await self.audit(caller, "node.approve", node_id)
        return identity

    async def revoke(self, caller: Principal, node_id: str) -> access_pb2.NodeIdentity:
        def revoke(identity):
            identity.revoked = True

        identity = await self._update_identity(node_id, revoke)
        await self.audit(caller, "node.revoke", node_id)
        return identity

    # --- API keys ------------------------------------------------------------------------
    async def create_key(
        self, caller: Principal, name: str, scopes: list[str]
    ) -> access_pb2.CreateApiKeyResponse:
        scopes = sorted(set(scopes)) or [auth.INFERENCE]
        if any(scope not in auth.SCOPES for scope in scopes) or len(name) > MAX_NAME:
            raise error_of(
                Reason.INVALID_REQUEST,
                f"scopes must be among {', '.join(auth.SCOPES)}; name at most {MAX_NAME} chars",
            )
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = {
            "secret_sha256": _hash(secret),
            "name": name or key_id,
            "scopes": scopes,
            "created_at": time.time(),
            "created_by": caller.who,
        }
        info = _key_info(key_id, record)
        await self._etcd.put(self._keys.api_key(key_id), json.dumps(record).encode())
        self._api_keys[key_id] = record
        await self.audit(caller, "key.create", key_id, name=info.name, scopes=",".join(scopes))
        return access_pb2.CreateApiKeyResponse(key=f"{KEY_PREFIX}_{key_id}_{secret}", info=info)

    async def list_keys(self) -> list[access_pb2.ApiKey]:
        kvs, _ = await self._etcd.get_prefix(self._keys.api_keys)
        keys = [_key_info(Keys.last_segment(kv.key), json.loads(kv.value)) for kv in kvs]
        return sorted(keys, key=lambda k: k.created_at)

    async def revoke_key(self, caller: Principal, key_id: str) -> None:
        if not key_id or not await self._etcd.delete(self._keys.api_key(key_id)):
            raise error_of(Reason.ACCESS_NOT_FOUND, f"no API key {key_id!r}")
        self._api_keys.pop(key_id, None)
        await self.audit(caller, "key.revoke", key_id)

    async def key_principal(self, key: str) -> Principal | None:
        """The caller an API key names; None for an unknown, revoked or wrong key."""
        parsed = parse_api_key(key)
        if parsed is None:
            return None
        key_id, secret = parsed
        record = self._api_keys.get(key_id)
        if record is None:  # created a moment ago through another replica?
            kv = await self._etcd.get(self._keys.api_key(key_id))
            record = json.loads(kv.value) if kv is not None else None
        if record is None or not hmac.compare_digest(record["secret_sha256"], _hash(secret)):
            return None
        return Principal("key", key_id, record["name"], frozenset(record["scopes"]))

    # --- audit ---------------------------------------------------------------------------
    async def audit(self, caller: Principal, action: str, target: str, **details: str) -> None:
        entry = access_pb2.AuditEntry(
            at=time.time(), who=caller.who, action=action, target=target, details=details
        )
        line = {"at": entry.at, "who": entry.who, "action": action, "target": target, **details}
        audit_log.info(json.dumps(line, sort_keys=True))
        key = f"{self._keys.audit}{entry.at:017.6f}-{secrets.token_hex(4)}"
        try:
            lease = await self._etcd.grant(self.audit_retention_s)
            await self._etcd.put(key, entry.SerializeToString(), lease=lease)
        except Exception as exc:  # the action is done; losing its record is logged, not fatal
            log.error("could not store the audit record %s: %s", line, exc)

    async def list_audit(self, limit: int) -> list[access_pb2.AuditEntry]:
        if not 0 <= limit <= MAX_AUDIT_ENTRIES:
            raise error_of(
                Reason.INVALID_REQUEST, f"limit must be in [0, {MAX_AUDIT_ENTRIES}] (0: 100)"
            )
        kvs, _ = await self._etcd.get_prefix(self._keys.audit)
        entries = [access_pb2.AuditEntry.FromString(kv.value) for kv in kvs]
        entries.sort(key=lambda e: e.at, reverse=True)
        return entries[: limit or 100]
