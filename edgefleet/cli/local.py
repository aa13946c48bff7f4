"""``edgefleet up``, ``traces``, ``etcd``: local fleets for demos and tests."""

from __future__ import annotations

import sys

from edgefleet import defaults


def _add_up(sub) -> None:
    p = sub.add_parser("up", help="run a local fleet: etcd, a coordinator and N nodes")
    p.add_argument(
        "--config",
        metavar="FLEET_YAML",
        default=None,
        help="a fleet file: nodes (ids, models, labels, slots, any node key), the "
        "coordinator's keys, load balancing and failover (README: Configuration file); "
        "flags given here override it",
    )
    p.add_argument("--nodes", type=int, default=None, help="how many nodes (default 2)")
    p.add_argument(
        "--model",
        default=None,
        help=f"the model every node starts with (default {defaults.DEFAULT_MODEL}); every "
        "other catalog model is loaded on demand, on one node, by the first request for it",
    )
    p.add_argument("--slots", type=int, default=None, help="slots per node (default 2)")
    p.add_argument(
        "--grpc",
        default=None,
        help=f"coordinator gRPC address (default {defaults.COORDINATOR_GRPC})",
    )
    p.add_argument(
        "--http",
        default=None,
        help=f"coordinator HTTP address (default {defaults.COORDINATOR_HTTP})",
    )
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

    if (args.nodes is not None and args.nodes < 1) or (args.slots is not None and args.slots < 1):
        print("error: need --nodes >= 1 and --slots >= 1", file=sys.stderr)
        return 2
    spec = None
    if args.config:
        try:
            spec = _fleet_file(args)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    coordinator = spec.coordinator if spec else {}
    return up.run(
        nodes=args.nodes or 2,
        model=args.model or defaults.DEFAULT_MODEL,
        grpc_address=args.grpc or str(coordinator.pop("grpc", defaults.COORDINATOR_GRPC)),
        http_address=args.http or str(coordinator.pop("http", defaults.COORDINATOR_HTTP)),
        slots=args.slots or 2,
        chat=args.chat,
        keep_logs=args.keep_logs,
        secure=not (args.insecure or (spec is not None and spec.insecure)),
        spec=spec,
    )


def _fleet_file(args):
    """The fleet file, checked against the node's and coordinator's own flags;
    ``--model`` and ``--slots`` on the command line override every node's."""
    import argparse

    from edgefleet import config_file
    from edgefleet.cli import coordinator, node
    from edgefleet.local.fleet_file import load

    daemons = argparse.ArgumentParser().add_subparsers()
    node.add(daemons)
    coordinator.add(daemons)
    spec = load(
        args.config,
        node_options=config_file.options(daemons.choices["node"]),
        coordinator_options=config_file.options(daemons.choices["coordinator"]),
    )
    if args.nodes is not None:
        raise ValueError(f"--nodes and {args.config} both say how many nodes: keep one")
    if args.insecure and any(n.labels for n in spec.nodes):
        raise ValueError(
            f"{args.config}: labels need a secure fleet (a node's labels come from its "
            "join token): drop --insecure or the labels"
        )
    for entry in spec.nodes:
        if args.model:
            entry.settings["models"] = args.model
        if args.slots:
            entry.settings["slots"] = args.slots
    return spec


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
