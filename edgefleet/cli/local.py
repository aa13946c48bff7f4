"""``edgefleet up``, ``traces``, ``etcd``: local fleets for demos and tests."""

from __future__ import annotations

import sys

from edgefleet import defaults


def _add_up(sub) -> None:
    p = sub.add_parser("up", help="run a local fleet: etcd, a coordinator and N nodes")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--model", default=defaults.DEFAULT_MODEL)
    p.add_argument("--slots", type=int, default=2, help="slots per node")
    p.add_argument("--grpc", default=defaults.COORDINATOR_GRPC, help="coordinator gRPC address")
    p.add_argument("--http", default=defaults.COORDINATOR_HTTP, help="coordinator HTTP address")
    p.add_argument(
        "--chat",
        default=None,
        metavar="PROMPT",
        help="stream one chat through the fleet, then stop it",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the logs directory")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no CA, no join tokens, no TLS or keys (default: a secure fleet on loopback)",
    )
    p.set_defaults(func=_up)


def _up(args) -> int:
    from edgefleet.local import up

    if args.nodes < 1 or args.slots < 1:
        print("error: need --nodes >= 1 and --slots >= 1", file=sys.stderr)
        return 2
    return up.run(
        nodes=args.nodes,
        model=args.model,
        grpc_address=args.grpc,
        http_address=args.http,
        slots=args.slots,
        chat=args.chat,
        keep_logs=args.keep_logs,
        secure=not args.insecure,
    )


def _add_traces(sub) -> None:
    p = sub.add_parser(
        "traces", help="run a local fleet with tracing, chat once, print the trace's span tree"
    )
    p.add_argument("prompt", nargs="?", default="Write a haiku about a lighthouse.")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--model", default=defaults.DEFAULT_MODEL)
    p.add_argument("--out", default="trace.json", help="file for the spans as JSON")
    p.set_defaults(func=_traces)


def _traces(args) -> int:
    from pathlib import Path

    from edgefleet.local import up

    return up.run_traces(nodes=args.nodes, model=args.model, prompt=args.prompt, out=Path(args.out))


def _add_etcd(sub) -> None:
    p = sub.add_parser("etcd", help="run a standalone local etcd server (Ctrl-C to stop)")
    p.add_argument("--members", type=int, default=1)
    p.set_defaults(func=_etcd)


def _etcd(args) -> int:
    import signal
    import threading

    from edgefleet.local.etcd_server import EtcdCluster

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = EtcdCluster(args.members).start()
    try:
        print(f"etcd ready: {','.join(cluster.endpoints)} (data in {cluster.base_dir})", flush=True)
        stop.wait()
    finally:
        cluster.stop()
    return 0


def add(sub) -> None:
    _add_up(sub)
    _add_traces(sub)
    _add_etcd(sub)
