"""``edgefleet coordinator``: run a coordinator replica."""

from __future__ import annotations

import math
import sys

from edgefleet.cli.common import addresses, option
from edgefleet.config_file import add_config

COORDINATOR_CONFIG = "/etc/edgefleet/coordinator.yaml"


def _add_coordinator(sub) -> None:
    from coordinator.config import CoordinatorConfig
    from coordinator.placement import POLICIES

    base = CoordinatorConfig()
    p = sub.add_parser("coordinator", help="run a coordinator replica (state in etcd)")
    add_config(p, COORDINATOR_CONFIG)
    option(
        p,
        "--etcd",
        many=True,
        env="ETCD",
        default=",".join(base.etcd),
        help="etcd endpoint(s) host:port[,host:port...]",
    )
    option(
        p,
        "--etcd-prefix",
        env="ETCD_PREFIX",
        default=base.etcd_prefix,
        help="key prefix, so several fleets can share one etcd",
    )
    option(p, "--grpc", env="COORDINATOR_GRPC", default=base.grpc, help="gRPC address")
    option(
        p,
        "--http",
        env="COORDINATOR_HTTP",
        default=base.http,
        help='HTTP address: /healthz, /readyz, /metrics ("off" to disable)',
    )
    option(p, "--id", env="COORDINATOR_ID", default="", help="default: hostname-port")
    option(
        p, "--policy", env="POLICY", default=base.policy, choices=POLICIES, help="placement policy"
    )
    p.add_argument(
        "--placement-sample",
        type=int,
        default=base.placement_sample,
        help="in larger fleets, rank a random sample of this many nodes (plus the session's)",
    )
    p.add_argument(
        "--node-lease-ttl",
        type=float,
        default=base.node_lease_ttl_s,
        help="seconds without heartbeat before a node leaves the fleet",
    )
    p.add_argument("--heartbeat-interval", type=float, default=base.heartbeat_interval_s)
    p.add_argument(
        "--session-idle-ttl",
        type=float,
        default=base.session_idle_ttl_s,
        help="seconds without a turn before a session expires",
    )
    p.add_argument("--session-max-messages", type=int, default=base.session_max_messages)
    p.add_argument("--session-max-bytes", type=int, default=base.session_max_bytes)
    p.add_argument(
        "--key-max-sessions",
        type=int,
        default=base.key_max_sessions,
        help="live sessions one API key may hold (0: no limit)",
    )
    p.add_argument(
        "--key-max-bytes",
        type=int,
        default=base.key_max_bytes,
        help="bytes of sessions and stored conversations one API key may keep in etcd "
        "(0: no limit)",
    )
    p.add_argument(
        "--etcd-wait",
        type=float,
        default=base.startup_etcd_wait_s,
        help="seconds to wait for etcd at start before giving up",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=base.stall_timeout_s,
        help="seconds without a token before a stream fails over to another node",
    )
    p.add_argument(
        "--first-token-timeout",
        type=float,
        default=base.first_token_timeout_s,
        help="seconds a node may take to the first token (prompt processing)",
    )
    p.add_argument(
        "--max-failovers",
        type=int,
        default=base.max_failovers,
        help="node failovers allowed per reply (0 = none)",
    )
    option(
        p,
        "--api-key",
        action="append",
        env="API_KEY",
        default=[],
        help="require this Bearer key on the HTTP API (repeatable; env EDGEFLEET_API_KEY)",
    )
    p.add_argument("--api-key-file", default="", help="file with one accepted key per line")
    p.add_argument(
        "--auto-model",
        action="append",
        default=[],
        metavar="CLASS=ALIAS",
        help='model for "model": "auto" requests of a task class (simple, complex); '
        "default: smallest / largest model served",
    )
    limits = p.add_argument_group("connections and quotas (README: limits; 0 turns one off)")
    limits.add_argument(
        "--http-header-timeout",
        type=float,
        default=base.http_header_timeout_s,
        help="seconds an HTTP connection has to send a whole request head",
    )
    limits.add_argument(
        "--http-idle-timeout",
        type=float,
        default=base.http_idle_timeout_s,
        help="seconds an idle keep-alive HTTP connection stays open",
    )
    limits.add_argument(
        "--http-body-timeout",
        type=float,
        default=base.http_body_timeout_s,
        help="seconds a request body may take, plus 1 s per --http-body-min-rate bytes",
    )
    limits.add_argument(
        "--http-body-min-rate",
        type=int,
        default=base.http_body_min_rate,
        help="bytes/s a request body must keep up after --http-body-timeout",
    )
    limits.add_argument(
        "--http-max-connections",
        type=int,
        default=base.http_max_connections,
        help="HTTP connections served at once; each one beyond gets 503 and is closed",
    )
    limits.add_argument(
        "--rate-limit",
        type=float,
        default=base.rate_limit,
        help="generations per second per API key, per replica",
    )
    limits.add_argument(
        "--rate-burst",
        type=int,
        default=base.rate_burst,
        help="generations an API key may start at once after a quiet spell",
    )
    limits.add_argument(
        "--max-streams-per-key",
        type=int,
        default=base.max_streams_per_key,
        help="generations in progress at once per API key, per replica",
    )
    security = p.add_argument_group("security (README: Security)")
    option(
        security,
        "--insecure",
        action="store_true",
        env="INSECURE",
        default=False,
        help="no TLS, no certificates, no key checks on gRPC: one trusted machine only",
    )
    option(
        security,
        "--node-grpc",
        env="COORDINATOR_NODE_GRPC",
        default="",
        help="where nodes register, mutual TLS (default: the --grpc host, port + 1)",
    )
    option(
        security,
        "--state-dir",
        env="STATE_DIR",
        default="",
        help="fleet secret and admin profile (default /var/lib/edgefleet/coordinator "
        "as root, else ~/.local/state/edgefleet/coordinator)",
    )
    security.add_argument(
        "--fleet-secret-file",
        default="",
        help="seals the fleet CA's key in etcd; every replica needs the same one "
        "(default <state-dir>/fleet-secret, created by the first replica)",
    )
    security.add_argument("--tls-ca", default="", help="the operator's CA certificate (PEM)")
    security.add_argument("--tls-ca-key", default="", help="the operator's CA key (PEM)")
    security.add_argument("--tls-cert", default="", help="HTTPS certificate chain (PEM)")
    security.add_argument("--tls-key", default="", help="HTTPS key (PEM)")
    security.add_argument(
        "--tls-auto", action="store_true", help="HTTPS with a certificate from the fleet CA"
    )
    security.add_argument(
        "--http-require-key",
        action="store_true",
        help="require an API key on HTTP even on loopback (default: keyless on loopback)",
    )
    security.add_argument(
        "--cert-ttl",
        type=float,
        default=base.cert_ttl_s,
        help="seconds a node or replica certificate lives (renewed at two thirds)",
    )
    security.add_argument(
        "--audit-retention",
        type=float,
        default=base.audit_retention_s,
        help="seconds admin actions stay in the audit log",
    )
    security.add_argument(
        "--dev", action="store_true", help="gRPC reflection, /docs and /openapi.json"
    )
    option(security, "--etcd-cacert", env="ETCD_CACERT", default="", help="etcd's CA")
    option(security, "--etcd-cert", env="ETCD_CERT", default="", help="client cert")
    option(security, "--etcd-key", env="ETCD_KEY", default="", help="client key")
    p.add_argument(
        "--bundle-dir",
        default="",
        help="serve the node bundles in this folder (`edgefleet bundle`) to holders of a join "
        "token: GET /install.sh and /bundle/FILE on the HTTP listener (README: Deploy)",
    )
    p.add_argument(
        "--model-dir",
        default="",
        help="where the files of models added with `edgefleet models add` are kept "
        "(default: <state dir>/models); nodes fetch them from here",
    )
    p.set_defaults(func=_run_coordinator)


def _run_coordinator(args) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.daemon import run

    etcd = addresses(args.etcd)
    if not etcd:
        print("error: --etcd needs at least one host:port", file=sys.stderr)
        return 2
    if any(
        item.count("=") != 1 or item.split("=")[0] not in ("simple", "complex")
        for item in args.auto_model
    ):
        print("error: --auto-model takes simple=ALIAS or complex=ALIAS", file=sys.stderr)
        return 2
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            with open(args.api_key_file) as handle:
                keys += [line.strip() for line in handle if line.strip()]
        except OSError as error:
            print(f"error: cannot read --api-key-file: {error}", file=sys.stderr)
            return 2
    if args.node_lease_ttl < 1 or args.heartbeat_interval <= 0 or args.placement_sample < 1:
        print(
            "error: need --node-lease-ttl >= 1, --heartbeat-interval > 0 "
            "and --placement-sample >= 1",
            file=sys.stderr,
        )
        return 2
    numbers = (
        args.http_header_timeout,
        args.http_idle_timeout,
        args.http_body_timeout,
        args.http_body_min_rate,
        args.http_max_connections,
        args.rate_limit,
        args.rate_burst,
        args.max_streams_per_key,
    )
    if not all(math.isfinite(n) and n >= 0 for n in numbers):
        print("error: timeouts, rates and limits must be numbers >= 0", file=sys.stderr)
        return 2
    if args.key_max_sessions < 0 or args.key_max_bytes < 0:
        print("error: --key-max-sessions and --key-max-bytes must be >= 0", file=sys.stderr)
        return 2
    return run(
        CoordinatorConfig(
            etcd=etcd,
            etcd_prefix=args.etcd_prefix,
            grpc=args.grpc,
            http=args.http,
            coordinator_id=args.id,
            policy=args.policy,
            placement_sample=args.placement_sample,
            node_lease_ttl_s=args.node_lease_ttl,
            heartbeat_interval_s=args.heartbeat_interval,
            session_idle_ttl_s=args.session_idle_ttl,
            session_max_messages=args.session_max_messages,
            session_max_bytes=args.session_max_bytes,
            key_max_sessions=args.key_max_sessions,
            key_max_bytes=args.key_max_bytes,
            startup_etcd_wait_s=args.etcd_wait,
            stall_timeout_s=args.stall_timeout,
            first_token_timeout_s=args.first_token_timeout,
            max_failovers=args.max_failovers,
            http_header_timeout_s=args.http_header_timeout,
            http_idle_timeout_s=args.http_idle_timeout,
            http_body_timeout_s=args.http_body_timeout,
            http_body_min_rate=args.http_body_min_rate,
            http_max_connections=args.http_max_connections,
            rate_limit=args.rate_limit,
            rate_burst=args.rate_burst,
            max_streams_per_key=args.max_streams_per_key,
            api_keys=tuple(keys),
            auto_models=tuple(tuple(item.split("=", 1)) for item in args.auto_model),
            insecure=args.insecure,
            node_grpc=args.node_grpc,
            state_dir=args.state_dir,
            fleet_secret_file=args.fleet_secret_file,
            tls_ca=args.tls_ca,
            tls_ca_key=args.tls_ca_key,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_auto=args.tls_auto,
            http_keyless_loopback=not args.http_require_key,
            cert_ttl_s=args.cert_ttl,
            audit_retention_s=args.audit_retention,
            dev=args.dev,
            etcd_cacert=args.etcd_cacert,
            etcd_cert=args.etcd_cert,
            etcd_key=args.etcd_key,
            bundle_dir=args.bundle_dir,
            model_dir=args.model_dir,
        )
    )


def add(sub) -> None:
    _add_coordinator(sub)
