"""Who is calling, and may they: one guard per gRPC listener.

Each daemon wraps its servicers once, with a table that names a policy for
every RPC of the service (``guard``). A method missing from the table is a
start-up error, so a new RPC cannot ship without a decision. The guard
authenticates the call (an API key, or the peer's fleet certificate on a
mutual-TLS listener), checks the policy, and hands the ``Principal`` to the
use case through ``CALLER``; the use case decides what depends on *which*
caller (a node may speak only for its own id; a session belongs to the key
that created it).
"""

from __future__ import annotations

import contextvars
import functools
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc

from edgefleet.errors import EdgefleetError, Reason, abort_with, error_of

INFERENCE = "inference"
ADMIN = "admin"
SCOPES = (INFERENCE, ADMIN)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    kind: ``key`` (an API key), ``node`` or ``coordinator`` (a fleet
    certificate), ``anonymous`` (keyless HTTP on loopback), ``insecure``
    (a fleet started with ``--insecure``: no checks at all).
    """

    kind: str
    principal_id: str = ""
    name: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)

    def can(self, scope: str) -> bool:
        return self.kind == "insecure" or scope in self.scopes

    @property
    def owner(self) -> str:
        """Whose sessions and stored responses this caller sees ("" = unbound)."""
        if self.kind == "key":
            return f"key:{self.principal_id}"
        if self.kind == "anonymous":
            return "anonymous"
        return ""

    @property
    def who(self) -> str:
        """The name written to the audit log."""
        return f"{self.kind}:{self.name or self.principal_id}" if self.principal_id else self.kind


INSECURE = Principal("insecure", scopes=frozenset(SCOPES))
ANONYMOUS = Principal("anonymous", scopes=frozenset({INFERENCE}))
PUBLIC_CALLER = Principal("public")  # a public method's caller: not authenticated

# The caller of the RPC being served (set by the guard, read by use cases).
CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("caller", default=INSECURE)


def owner_may_see(record_owner: str, caller: Principal) -> bool:
    """A session or stored response is visible to the key that created it only."""
    if caller.kind == "insecure":
        return True
    return hmac.compare_digest(record_owner, caller.owner)


# --- policies -------------------------------------------------------------------------------
PUBLIC = "public"  # anyone: what it returns is public (a join checks its token itself)
NODE = "node"  # a node's fleet certificate (mutual-TLS listener)
COORDINATOR = "coordinator"  # a coordinator's fleet certificate
FLEET = "fleet"  # either: a node's or a coordinator's fleet certificate
NOT_HERE = "not-here"  # this listener does not serve the method
# ...or a scope name (INFERENCE, ADMIN): an API key with that scope.
POLICIES = (PUBLIC, NODE, COORDINATOR, FLEET, NOT_HERE, *SCOPES)


def permitted(policy: str, caller: Principal | None) -> Reason | None:
    """None if ``caller`` may make a call under ``policy``, else the reason it may not."""
    if policy == PUBLIC:
        return None
    if policy == NOT_HERE:
        return Reason.NOT_PERMITTED
    if caller is None:
        return Reason.NOT_AUTHENTICATED
    if caller.kind == "insecure":
        return None
    if policy in (NODE, COORDINATOR):
        return None if caller.kind == policy else Reason.NOT_PERMITTED
    if policy == FLEET:
        return None if caller.kind in (NODE, COORDINATOR) else Reason.NOT_PERMITTED
    if caller.kind in (NODE, COORDINATOR):
        return Reason.NOT_PERMITTED
    return None if caller.can(policy) else Reason.NOT_PERMITTED


Authenticate = Callable[[grpc.aio.ServicerContext], Awaitable[Principal | None]]


def guard(
    servicer,
    service: str,
    methods: Mapping[str, str],
    authenticate: Authenticate,
    *,
    not_here: str = "",
) -> object:
    """Wrap every RPC of ``servicer`` (``service`` descriptor) in a policy check.

    ``methods`` maps each RPC name of the service to a policy; every RPC must
    be named. ``not_here``: the message for a method this listener refuses.
    """
    from google.protobuf import descriptor_pool

    descriptor = descriptor_pool.Default().FindServiceByName(service)
    names = {m.name for m in descriptor.methods}
    missing = names - set(methods)
    unknown = {policy for policy in methods.values() if policy not in POLICIES}
    if missing or unknown:
        raise ValueError(f"{service}: no policy for {sorted(missing)}; unknown {sorted(unknown)}")
    for method in descriptor.methods:
        policy = methods[method.name]
        handler = getattr(servicer, method.name)
        wrapped = (
            _streaming(handler, policy, authenticate, method.name, not_here)
            if method.server_streaming
            else _unary(handler, policy, authenticate, method.name, not_here)
        )
        setattr(servicer, method.name, wrapped)
    return servicer


async def _admit(context, policy: str, authenticate: Authenticate, method: str, not_here: str):
    caller = None if policy in (PUBLIC, NOT_HERE) else await authenticate(context)
    reason = permitted(policy, caller)
    if reason is None:
        CALLER.set(caller if caller is not None else PUBLIC_CALLER)
        return
    if policy == NOT_HERE:
        message = not_here or f"{method} is not served on this listener"
    elif reason is Reason.NOT_AUTHENTICATED:
        message = f"{method} needs a credential: an API key (authorization: Bearer ...)"
        if policy in (NODE, COORDINATOR, FLEET):
            message = f"{method} needs a {policy} certificate from the fleet CA"
    elif policy in (NODE, COORDINATOR, FLEET):
        members = "fleet members" if policy == FLEET else f"{policy}s"
        message = f"{method} is for {members}; the caller is {caller.who}"
    else:
        message = f"{method} needs the {policy!r} scope; {caller.who} does not have it"
    raise error_of(reason, message)


def _unary(handler, policy, authenticate, method, not_here):
    @functools.wraps(handler)
    async def checked(request, context):
        try:
            await _admit(context, policy, authenticate, method, not_here)
        except EdgefleetError as error:
            await abort_with(context, error)
        return await handler(request, context)

    return checked


def _streaming(handler, policy, authenticate, method, not_here):
    @functools.wraps(handler)
    async def checked(request, context):
        try:
            await _admit(context, policy, authenticate, method, not_here)
        except EdgefleetError as error:
            await abort_with(context, error)
        async for reply in handler(request, context):
            yield reply

    return checked


def static_key_principal(key: str, static_keys) -> Principal | None:
    """A key given with ``--api-key``: an ``inference`` caller (compared in constant time)."""
    if key and any(hmac.compare_digest(key, static) for static in static_keys):
        return Principal("key", "static", "static key", frozenset({INFERENCE}))
    return None


def bearer(metadata) -> str:
    """The API key in ``authorization: Bearer KEY`` call metadata ("" if none)."""
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            return value.removeprefix("Bearer ").strip()
    return ""
