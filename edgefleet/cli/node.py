"""``edgefleet node``: run a node agent; ``generate`` and ``capacity``: talk to one directly."""

from __future__ import annotations

import sys

from edgefleet import defaults
from edgefleet.cli.common import addresses, env, option
from edgefleet.config_file import add_config

NODE_CONFIG = "/etc/edgefleet/node.yaml"


def _add_node(sub) -> None:
    from node_agent.config import NodeConfig

    base = NodeConfig()
    p = sub.add_parser(
        "node",
        help="run a node agent serving local models over gRPC; "
        "`node ls|approve ID|revoke ID` manage the fleet's node identities",
    )
    add_config(p, NODE_CONFIG)
    p.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=("run", "ls", "approve", "revoke"),
        help="run (default): the node agent; ls, approve ID, revoke ID: operators' commands",
    )
    p.add_argument("target", nargs="?", default="", help="node id (approve, revoke)")
    p.add_argument("--profile", default="", help="client profile (ls, approve, revoke)")
    option(p, "--listen", env="NODE_LISTEN", default=base.listen, help="host:port")
    option(
        p,
        "--models",
        many=True,
        env="NODE_MODELS",
        default=",".join(base.models),
        help="comma-separated catalog aliases or .gguf paths to load at start",
    )
    option(
        p,
        "--slots",
        type=int,
        env="NODE_SLOTS",
        default=base.slots,
        help="parallel generations per model",
    )
    option(
        p,
        "--queue",
        type=int,
        env="NODE_QUEUE",
        default=base.queue,
        help="requests that may wait for a slot before RESOURCE_EXHAUSTED",
    )
    option(
        p,
        "--continuation-slots",
        type=int,
        env="NODE_CONTINUATION_SLOTS",
        default=base.continuation_slots,
        help="extra slots per model only for replies continued after another node "
        "failed, so they restart at once even when every slot is busy",
    )
    option(
        p,
        "--context",
        type=int,
        env="NODE_CONTEXT",
        default=base.context_length,
        help="context window per slot, in tokens",
    )
    option(
        p,
        "--threads",
        type=int,
        env="NODE_THREADS",
        default=base.threads,
        help="CPU threads for inference (shared by running generations)",
    )
    option(
        p,
        "--gpu-layers",
        type=int,
        env="NODE_GPU_LAYERS",
        default=0,
        help="layers to offload to a GPU (-1 = all)",
    )
    option(
        p,
        "--memory-budget",
        env="NODE_MEMORY_BUDGET",
        default=base.memory_budget,
        help="memory for loaded models: bytes (4GiB, 512MB) or a percent of the host's "
        "memory (80%%); a load past it evicts idle models first, else is refused",
    )
    option(
        p,
        "--model-cache-size",
        env="NODE_MODEL_CACHE_SIZE",
        default=base.model_cache_size,
        help="most disk for model files: bytes (20GiB) or a percent of the store's disk "
        "(50%%); a fetch past it first deletes the model's other files, then the least "
        "recently used ones not in use (default: no limit, nothing deleted)",
    )
    option(
        p,
        "--models-max",
        type=int,
        env="NODE_MODELS_MAX",
        default=base.models_max,
        help="most models loaded at once (idle ones are evicted, least recently used first)",
    )
    option(
        p,
        "--keep-alive",
        env="NODE_KEEP_ALIVE",
        default="5m",
        help="how long a model loaded on demand may stay idle before it is unloaded "
        "(30s, 5m, 1h, forever); the --models loaded at start are kept",
    )
    option(
        p,
        "--battery-keep-alive",
        env="NODE_BATTERY_KEEP_ALIVE",
        default="1m",
        help="on battery, models loaded on demand are unloaded after this idle time "
        "(sooner than --keep-alive; forever: no difference)",
    )
    option(
        p,
        "--idle-check",
        env="NODE_IDLE_CHECK",
        default=f"{base.idle_check_s:g}s",
        help="how often idle models are looked for",
    )
    option(p, "--node-id", env="NODE_ID", default="", help="default: hostname-port")
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=base.shutdown_grace_s,
        help="seconds in-flight streams get to finish on SIGTERM",
    )
    option(
        p,
        "--coordinator",
        many=True,
        env="COORDINATOR",
        default="",
        help="coordinator address(es) host:port[,host:port...] to join; none = standalone",
    )
    option(
        p,
        "--advertise",
        env="NODE_ADVERTISE",
        default="",
        help="address coordinators reach this node at (default: --listen)",
    )
    option(
        p,
        "--metrics",
        env="NODE_METRICS",
        default="",
        help="host:port for a Prometheus /metrics listener (default: none)",
    )
    option(
        p,
        "--runtime",
        choices=("llama.cpp", "simulated"),
        env="NODE_RUNTIME",
        default=base.runtime,
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
    security = p.add_argument_group("security (README: Security)")
    option(
        security,
        "--join",
        env="JOIN_TOKEN",
        default="",
        metavar="TOKEN",
        help="join the fleet with this token (env EDGEFLEET_JOIN_TOKEN); once joined, "
        "the identity in --state-dir is used and the token is not needed again",
    )
    option(
        security,
        "--state-dir",
        env="STATE_DIR",
        default="",
        help="the node's identity (default /var/lib/edgefleet/node as root, else "
        "~/.local/state/edgefleet/node)",
    )
    option(
        security,
        "--insecure",
        action="store_true",
        env="INSECURE",
        default=False,
        help="plaintext, no certificates: only with a coordinator run --insecure",
    )
    security.add_argument("--dev", action="store_true", help="gRPC reflection")
    p.set_defaults(func=_run_node)


def _run_node(args) -> int:
    from node_agent.config import NodeConfig
    from node_agent.daemon import run

    if args.action != "run":
        from edgefleet.cli.access import node_identities

        return node_identities(args)

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.sim_tokens_per_s <= 0 or args.sim_cold_start_s < 0:
        print("error: need --sim-tokens-per-s > 0 and --sim-cold-start-s >= 0", file=sys.stderr)
        return 2
    if (
        args.slots < 1
        or args.queue < 0
        or not 0 <= args.continuation_slots <= 64
        or args.context < 64
        or args.threads < 1
    ):
        print(
            "error: need --slots >= 1, --queue >= 0, --continuation-slots in [0, 64], "
            "--context >= 64, --threads >= 1",
            file=sys.stderr,
        )
        return 2
    from edgefleet.model_memory import parse_budget, parse_duration

    try:
        parse_budget(args.memory_budget, 1 << 40)
        if args.model_cache_size:
            parse_budget(args.model_cache_size, 1 << 40)
        keep_alive_s = parse_duration(args.keep_alive)
        battery_keep_alive_s = parse_duration(args.battery_keep_alive)
        idle_check_s = parse_duration(args.idle_check)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.models_max < 1 or not idle_check_s:
        print("error: need --models-max >= 1 and --idle-check > 0", file=sys.stderr)
        return 2
    return run(
        NodeConfig(
            listen=args.listen,
            models=models,
            slots=args.slots,
            queue=args.queue,
            continuation_slots=args.continuation_slots,
            context_length=args.context,
            threads=args.threads,
            gpu_layers=args.gpu_layers,
            memory_budget=args.memory_budget,
            models_max=args.models_max,
            model_cache_size=args.model_cache_size,
            keep_alive_s=keep_alive_s,
            idle_check_s=idle_check_s,
            battery_keep_alive_s=battery_keep_alive_s,
            node_id=args.node_id,
            shutdown_grace_s=args.shutdown_grace,
            coordinators=addresses(args.coordinator),
            advertise=args.advertise,
            metrics=args.metrics,
            runtime=args.runtime,
            sim_tokens_per_s=args.sim_tokens_per_s,
            sim_cold_start_s=args.sim_cold_start_s,
            insecure=args.insecure,
            join_token=args.join,
            state_dir=args.state_dir,
            dev=args.dev,
        )
    )


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream one reply straight from a node (no coordinator)")
    p.add_argument("prompt")
    p.add_argument("--node", default=env("NODE", defaults.NODE_LISTEN), help="node host:port")
    p.add_argument("--model", default=defaults.DEFAULT_MODEL)
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print token counts and timings")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    import grpc

    from edgefleet.generation import sampling_params
    from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

    messages = []
    if args.system:
        messages.append(common_pb2.ChatMessage(role="system", content=args.system))
    messages.append(common_pb2.ChatMessage(role="user", content=args.prompt))
    sampling = sampling_params(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
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
    p.add_argument("--node", default=env("NODE", defaults.NODE_LISTEN), help="node host:port")
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


def add(sub) -> None:
    _add_node(sub)
    _add_generate(sub)
    _add_capacity(sub)
