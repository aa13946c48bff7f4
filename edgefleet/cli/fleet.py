"""``edgefleet status``, ``chat``, ``drain``: a fleet through its coordinators."""

from __future__ import annotations

import sys

from edgefleet import defaults
from edgefleet.cli.common import client as fleet_client
from edgefleet.cli.common import coordinator_arg


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="the fleet's nodes, their state and load")
    coordinator_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _status(args) -> int:
    from google.protobuf import json_format

    from edgefleet.errors import EdgefleetError
    from edgefleet.v1 import common_pb2

    try:
        with fleet_client(args) as client:
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
        "POWER",
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
                ",".join(model_text(m) for m in capacity.models)
                + (" (SIMULATED)" if capacity.simulated else ""),
                f"{capacity.cpu_percent:.0f}",
                f"{capacity.process_rss_bytes / 2**20:.0f}MiB",
                f"{capacity.slots_total - capacity.slots_free}/{capacity.slots_total}",
                f"{capacity.queue_depth}/{capacity.queue_limit}",
                str(node.sessions),
                power_text(capacity.power),
                f"{node.last_heartbeat_age_seconds:.1f}s",
            ]
        )
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
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
    coordinator_arg(p)
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
        with fleet_client(args) as client:
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
    coordinator_arg(p)
    p.set_defaults(func=_drain)


def _drain(args) -> int:
    from edgefleet.errors import EdgefleetError

    try:
        with fleet_client(args) as client:
            client.drain(args.node_id, drain=not args.undo)
    except EdgefleetError as error:
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        return 1
    print(f"{args.node_id}: {'resumed' if args.undo else 'draining'}")
    return 0


def add(sub) -> None:
    _add_status(sub)
    _add_chat(sub)
    _add_drain(sub)


def model_text(model) -> str:
    """A loaded model with the variant (quantization) this node got, and where
    its layers run: ``alias:q8_0``, ``alias:q8_0/gpu`` (all on a GPU) or
    ``alias:q8_0/gpu12`` (12 layers on a GPU)."""
    where = ""
    if model.gpu_layers < 0:
        where = "/gpu"
    elif model.gpu_layers > 0:
        where = f"/gpu{model.gpu_layers}"
    return f"{model.alias}:{model.quantization}{where}"


def power_text(power) -> str:
    """mains, battery 45%, or battery 12% low; with the temperature when hot."""
    text = "mains"
    if power.on_battery:
        text = f"battery {power.battery_percent:.0f}%"
    if power.throttled:
        text += f" hot {power.temperature_c:.0f}C"
    return text + (" (avoided)" if power.low_power else "")
