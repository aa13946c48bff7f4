"""``edgefleet token``, ``keys``, ``audit`` and ``node ls|approve|revoke``:
who may join and call the fleet (admin API key, from the profile)."""

from __future__ import annotations

import contextlib
import sys
import time

from edgefleet.cli.bundle import join_line
from edgefleet.cli.common import client, coordinator_arg, run_command


def _labels(value: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"labels are k=v[,k=v...]; got {item!r}")
        labels[key] = val
    return labels


def _duration(value: str) -> float:
    """90, 90s, 30m, 1h, 7d: seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = value.strip()
    if value and value[-1] in units:
        return float(value[:-1]) * units[value[-1]]
    return float(value)


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix)) if unix else "-"


# --- tokens ---------------------------------------------------------------------------------
def _token(args) -> int:
    from edgefleet.v1 import access_pb2

    def work():
        with client(args) as fleet:
            if args.token_command == "create":
                reply = fleet.access(
                    "CreateJoinToken",
                    access_pb2.CreateJoinTokenRequest(
                        ttl_seconds=_duration(args.ttl),
                        uses=args.uses,
                        labels=_labels(args.labels),
                        approve=args.approve,
                    ),
                )
                if args.join_line:  # the one-liner alone (make join-line)
                    print(join_line(args, reply.token))
                    return
                print(reply.token)
                info = reply.info
                uses = "unlimited uses" if info.unlimited else f"{info.uses_left} use(s)"
                approval = "approved at once" if reply.info.approve else "wait for approval"
                print(
                    f"# expires {_when(reply.info.expires_at)}, {uses}, nodes {approval}. "
                    "Join a device with: edgefleet node --join TOKEN --coordinator HOST:PORT",
                    file=sys.stderr,
                )
                with contextlib.suppress(ValueError):  # no HTTP address known: no line
                    line = join_line(args, reply.token)
                    print(f"# or in one line (bash): {line}", file=sys.stderr)
            elif args.token_command == "ls":
                reply = fleet.access("ListJoinTokens", access_pb2.ListJoinTokensRequest())
                print(f"{'ID':18} {'EXPIRES':20} {'USES':>9} {'APPROVE':8} LABELS")
                for token in reply.tokens:
                    uses = "unlimited" if token.unlimited else str(token.uses_left)
                    labels = ",".join(f"{k}={v}" for k, v in sorted(token.labels.items()))
                    print(
                        f"{token.token_id:18} {_when(token.expires_at):20} {uses:>9} "
                        f"{str(token.approve).lower():8} {labels}"
                    )
            else:
                fleet.access(
                    "RevokeJoinToken", access_pb2.RevokeJoinTokenRequest(token_id=args.token_id)
                )
                print(f"revoked join token {args.token_id}")

    return run_command(work)


# --- node identities ------------------------------------------------------------------------
def node_identities(args) -> int:
    from edgefleet.v1 import access_pb2

    if args.action in ("approve", "revoke") and not args.target:
        print(f"usage: edgefleet node {args.action} NODE_ID", file=sys.stderr)
        return 2

    def work():
        with client(args) as fleet:
            if args.action == "ls":
                reply = fleet.access("ListNodeIdentities", access_pb2.ListNodeIdentitiesRequest())
                print(f"{'NODE':24} {'STATE':9} {'CERT EXPIRES':20} {'JOINED':20} TOKEN")
                for node in sorted(reply.nodes, key=lambda n: n.node_id):
                    state = (
                        "revoked" if node.revoked else "approved" if node.approved else "pending"
                    )
                    print(
                        f"{node.node_id:24} {state:9} {_when(node.not_after):20} "
                        f"{_when(node.joined_at):20} {node.token_id}"
                    )
            elif args.action == "approve":
                fleet.access("ApproveNode", access_pb2.ApproveNodeRequest(node_id=args.target))
                print(f"approved node {args.target}: it registers at its next try")
            else:
                fleet.access("RevokeNode", access_pb2.RevokeNodeRequest(node_id=args.target))
                print(f"revoked node {args.target}: cut off from every coordinator")

    return run_command(work)


# --- API keys -------------------------------------------------------------------------------
def _keys(args) -> int:
    from edgefleet.v1 import access_pb2

    def work():
        with client(args) as fleet:
            if args.keys_command == "create":
                scopes = ["admin", "inference"] if args.scope == "admin" else ["inference"]
                reply = fleet.access(
                    "CreateApiKey", access_pb2.CreateApiKeyRequest(name=args.name, scopes=scopes)
                )
                print(reply.key)
                print(
                    f"# key {reply.info.key_id} ({reply.info.name}), scopes "
                    f"{','.join(reply.info.scopes)}; shown once, only its hash is stored",
                    file=sys.stderr,
                )
            elif args.keys_command == "ls":
                reply = fleet.access("ListApiKeys", access_pb2.ListApiKeysRequest())
                print(f"{'ID':14} {'SCOPES':18} {'CREATED':20} NAME")
                for key in reply.keys:
                    print(
                        f"{key.key_id:14} {','.join(key.scopes):18} "
                        f"{_when(key.created_at):20} {key.name}"
                    )
            else:
                fleet.access("RevokeApiKey", access_pb2.RevokeApiKeyRequest(key_id=args.key_id))
                print(f"revoked API key {args.key_id}")

    return run_command(work)


# --- audit ----------------------------------------------------------------------------------
def _audit(args) -> int:
    import json

    from edgefleet.v1 import access_pb2

    def work():
        with client(args) as fleet:
            reply = fleet.access("ListAudit", access_pb2.ListAuditRequest(limit=args.limit))
            for entry in reversed(reply.entries):
                line = {
                    "at": _when(entry.at),
                    "who": entry.who,
                    "action": entry.action,
                    "target": entry.target,
                    **dict(entry.details),
                }
                print(json.dumps(line))

    return run_command(work)


def add(sub) -> None:
    p = sub.add_parser("token", help="join tokens: create, ls, revoke (admin)")
    tokens = p.add_subparsers(dest="token_command", required=True)
    create = tokens.add_parser("create", help="print a new join token")
    create.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 7d (default 1h)")
    create.add_argument("--uses", type=int, default=0, help="joins allowed (0 = unlimited)")
    create.add_argument("--labels", default="", help="k=v[,k=v...] given to joining nodes")
    create.add_argument(
        "--approve", action="store_true", help="nodes serve at once (else: pending approval)"
    )
    create.add_argument(
        "--join-line",
        action="store_true",
        help="print only the one-line install for a device (curl ... | sudo sh), "
        "README: Deploy > One line from the coordinator",
    )
    create.add_argument(
        "--http-url",
        default="",
        help="the coordinator's HTTP listener as devices reach it, for the one-line install "
        "(default: the profile's; env EDGEFLEET_HTTP_URL)",
    )
    listing = tokens.add_parser("ls", help="live tokens (secrets are not shown)")
    revoke = tokens.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    for parser in (create, listing, revoke):
        coordinator_arg(parser)
        parser.set_defaults(func=_token)

    p = sub.add_parser("keys", help="API keys: create, ls, revoke (admin)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="print a new API key")
    create.add_argument("--scope", choices=("inference", "admin"), default="inference")
    create.add_argument("--name", default="", help="who or what uses it (shown in the audit)")
    listing = keys.add_parser("ls", help="API keys (secrets are not shown)")
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    for parser in (create, listing, revoke):
        coordinator_arg(parser)
        parser.set_defaults(func=_keys)

    p = sub.add_parser("audit", help="the admin actions: who, what, when (admin)")
    p.add_argument("--limit", type=int, default=100, help="newest N entries")
    coordinator_arg(p)
    p.set_defaults(func=_audit)
