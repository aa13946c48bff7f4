"""``edgefleet up``: a whole local fleet in one command.

Starts an etcd server (temporary data dir), one coordinator and N node agents
on loopback, each its own OS process, waits until every node has joined,
prints the addresses, and runs until Ctrl-C or SIGTERM; then stops the nodes,
the coordinator and etcd, in that order. ``--chat PROMPT`` streams one chat
through the fleet and stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgefleet import config_file
from edgefleet.client import FleetClient
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.fleet_file import FleetSpec, NodeSpec
from edgefleet.local.processes import (
    DaemonProcess,
    admin_client,
    free_port,
    join_token,
    start_coordinator,
    start_node,
)
from edgefleet.profile import LOCAL_FLEET, Profile, default_path
from edgefleet.v1 import common_pb2


@dataclass
class Fleet:
    workdir: Path
    etcd: EtcdCluster
    coordinator: DaemonProcess
    nodes: list[DaemonProcess]
    secure: bool = True
    extra_profile: Path | None = None

    def client(self) -> FleetClient:
        if self.secure:
            return admin_client(self.coordinator)
        return FleetClient([self.coordinator.address])

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.terminate(timeout_s=20)
        self.coordinator.terminate(timeout_s=20)
        self.etcd.stop()


def start_fleet(
    *,
    nodes: int,
    model: str,
    grpc_address: str,
    http_address: str,
    slots: int,
    workdir: Path,
    say=print,
    secure: bool = True,
    spec: FleetSpec | None = None,
) -> Fleet:
    """``secure``: a fleet CA, nodes joined with a token, mutual TLS between
    coordinator and nodes, API keys (the admin one in the coordinator's
    profile); else every daemon runs ``--insecure``. ``spec``: the nodes (ids,
    labels, settings) and coordinator settings of a fleet file; else ``nodes``
    nodes named node-1, node-2, ... ``model`` and ``slots`` are the nodes'
    defaults. Each daemon gets a config file in ``workdir`` (so no
    /etc/edgefleet file on this machine leaks into the local fleet)."""
    spec = spec or FleetSpec.plain(nodes)
    say(f"starting etcd (data in {workdir / 'etcd'})")
    etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
    say(f"starting coordinator on {grpc_address}")
    coordinator_config = workdir / "coordinator.yaml"
    config_file.write(coordinator_config, spec.coordinator)
    coordinator = start_coordinator(
        grpc_address=grpc_address,
        etcd=etcd.endpoints,
        http_address=http_address,
        extra_args=("--config", str(coordinator_config)),
        log_path=workdir / "coordinator.log",
        state_dir=workdir / "coordinator" if secure else None,
    )
    fleet = Fleet(workdir=workdir, etcd=etcd, coordinator=coordinator, nodes=[], secure=secure)
    try:
        coordinator.wait_serving(timeout_s=60)
        tokens = _join_tokens(coordinator, spec.nodes) if secure else {}
        if secure:
            say("made join tokens for the nodes (one use each, 10 minutes)")
        # The nodes share this machine's cores: split them rather than
        # oversubscribe (llama.cpp's worker threads spin while they wait).
        threads = max(1, (os.cpu_count() or 1) // len(spec.nodes))
        say(f"starting {len(spec.nodes)} node(s) with {model}, {threads} inference thread(s) each")
        for node in spec.nodes:
            settings = dict(node.settings)
            # What `up` itself chose goes on the command line; the rest in the file.
            node_models = str(settings.pop("models", model))
            node_slots = int(settings.pop("slots", slots))
            node_threads = int(settings.pop("threads", threads))
            address = str(settings.pop("listen", "") or f"127.0.0.1:{free_port()}")
            node_config = workdir / f"{node.node_id}.yaml"
            config_file.write(node_config, settings)
            process = start_node(
                listen=address,
                models=node_models,
                slots=node_slots,
                extra_args=(
                    "--coordinator",
                    grpc_address,
                    "--node-id",
                    node.node_id,
                    "--threads",
                    str(node_threads),
                    "--config",
                    str(node_config),
                ),
                log_path=workdir / f"{node.node_id}.log",
                name=node.node_id,
                join=(tokens[node.node_id], workdir / node.node_id) if secure else None,
            )
            process.extra["labels"] = dict(node.labels)
            fleet.nodes.append(process)
        for node in fleet.nodes:
            node.wait_serving(timeout_s=300)
        with fleet.client() as client:
            deadline = time.monotonic() + 60
            while True:
                ready = [n for n in client.status().nodes if n.state == common_pb2.NODE_STATE_READY]
                if len(ready) >= len(spec.nodes):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"only {len(ready)} of {len(spec.nodes)} nodes joined the fleet"
                    )
                time.sleep(0.1)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def _join_tokens(coordinator: DaemonProcess, nodes: list[NodeSpec]) -> dict[str, str]:
    """A join token per node id: one shared by the nodes of each label set (the
    token carries the labels), one use per node, 10 minutes."""
    from edgefleet.v1 import access_pb2

    groups: dict[tuple, list[str]] = {}
    for node in nodes:
        groups.setdefault(tuple(sorted(node.labels.items())), []).append(node.node_id)
    tokens = {}
    for labels, ids in groups.items():
        if labels:
            with admin_client(coordinator) as client:
                token = client.access(
                    "CreateJoinToken",
                    access_pb2.CreateJoinTokenRequest(
                        ttl_seconds=600, uses=len(ids), approve=True, labels=dict(labels)
                    ),
                ).token
        else:
            token = join_token(coordinator, uses=len(ids), ttl_s=600)
        tokens.update(dict.fromkeys(ids, token))
    return tokens


def describe(fleet: Fleet, grpc_address: str, http_address: str, ready_s: float) -> str:
    lines = [
        f"fleet ready in {ready_s:.1f}s",
        f"  etcd         {','.join(fleet.etcd.endpoints)}",
        f"  coordinator  grpc {grpc_address}  http {http_address}  pid {fleet.coordinator.pid}",
    ]
    for node in fleet.nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(node.extra.get("labels", {}).items()))
        lines.append(f"  {node.name:<12} {node.address}  pid {node.pid}  {labels}".rstrip())
    lines += [f"  logs         {fleet.workdir}"]
    if fleet.secure:
        lines += [
            f"  profile      {fleet.extra_profile} (fleet CA, admin API key, addresses)",
            "  security     mutual TLS node <-> coordinator, API keys on gRPC, HTTP keyless "
            "on loopback",
        ]
    lines += [
        "",
        "try:  edgefleet status",
        '      edgefleet chat "Hello!"',
        '      edgefleet chat --model gemma3-270m "Hello!"   (loaded on demand on one node)',
        "      edgefleet token create --ttl 1h   (join another device)",
        "      kill -9 <a node pid>   (a real node failure)",
    ]
    return "\n".join(lines)


def publish_profile(fleet: Fleet) -> Path:
    """Give the CLI this fleet's admin profile: at the default path when that is
    free or was written by an earlier ``edgefleet up``, else beside the logs."""
    profile = Profile.load(fleet.coordinator.extra["profile"])
    profile.written_by = LOCAL_FLEET
    target = default_path()
    if target.exists():
        try:
            if Profile.load(target).written_by != LOCAL_FLEET:
                target = fleet.workdir / "profile.json"
        except (OSError, ValueError):
            target = fleet.workdir / "profile.json"
    profile.save(target)
    return target


def run(
    *,
    nodes: int,
    model: str,
    grpc_address: str,
    http_address: str,
    slots: int,
    chat: str | None,
    keep_logs: bool,
    secure: bool = True,
    spec: FleetSpec | None = None,
) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-up-"))
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        fleet = start_fleet(
            nodes=nodes,
            model=model,
            grpc_address=grpc_address,
            http_address=http_address,
            slots=slots,
            workdir=workdir,
            secure=secure,
            spec=spec,
        )
        if secure:
            fleet.extra_profile = publish_profile(fleet)
    except (RuntimeError, TimeoutError, FileNotFoundError) as error:
        print(f"error: the fleet did not come up: {error}", file=sys.stderr)
        print(f"logs: {workdir}", file=sys.stderr)
        return 1
    try:
        print(describe(fleet, grpc_address, http_address, time.monotonic() - started), flush=True)
        if chat is not None:
            return _chat_once(fleet, _first_model(spec) or model, chat)
        while not stop.wait(1.0):
            for node in fleet.nodes:
                if not node.alive() and not node.extra.get("reported"):
                    node.extra["reported"] = True
                    print(
                        f"{node.name} (pid {node.pid}) exited with code {node.process.returncode}",
                        flush=True,
                    )
        print("stopping the fleet", flush=True)
        return 0
    finally:
        fleet.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        print("fleet stopped", flush=True)


def _first_model(spec: FleetSpec | None) -> str:
    """The model a fleet file's ``--chat`` asks for: its first node's first."""
    if spec is None:
        return ""
    models = str(spec.nodes[0].settings.get("models", ""))
    return next((m.strip() for m in models.split(",") if m.strip()), "")


def _chat_once(fleet: Fleet, model: str, prompt: str) -> int:
    with fleet.client() as client:
        session = client.create_session(model)
        print(f"\nsession {session.session_id}\n> {prompt}\n", flush=True)
        last = None
        for chunk in client.chat(session.session_id, prompt, max_tokens=256):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
        nodes = sorted({last.node_id}) if last else []
        usage = last.usage if last else None
        print(
            f"\n\n[served by {', '.join(nodes)}; prompt {usage.prompt_tokens} tokens, "
            f"reply {usage.completion_tokens} tokens]",
            flush=True,
        )
    return 0


TRACE_KEYS = (
    "gen_ai.request.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "edgefleet.node.id",
    "edgefleet.placement.candidates",
    "edgefleet.failover.attempt",
    "edgefleet.time_to_first_token_ms",
)


def run_traces(*, nodes: int, model: str, prompt: str, out: Path) -> int:
    """A local fleet exporting traces to an in-process OTLP receiver; one chat; its tree."""
    import json
    import os

    from edgefleet.local.otlp_receiver import OtlpReceiver, render_tree, span_tree

    receiver = OtlpReceiver().start()
    os.environ.update(receiver.exporter_env())  # the fleet's processes inherit it
    grpc_address = f"127.0.0.1:{free_port()}"
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-traces-"))
    try:
        fleet = start_fleet(
            nodes=nodes,
            model=model,
            grpc_address=grpc_address,
            http_address=f"127.0.0.1:{free_port()}",
            slots=2,
            workdir=workdir,
        )
    except (RuntimeError, TimeoutError) as error:
        print(f"error: the fleet did not come up: {error}", file=sys.stderr)
        receiver.stop()
        return 1
    try:
        _chat_once(fleet, model, prompt)

        def whole_trace(spans):
            roots = [s for s in spans if s.service == "edgefleet-coordinator" and s.kind == 2]
            if not roots:
                return None
            mine = [s for s in spans if s.trace_id == roots[-1].trace_id]
            return mine if any(s.name == "generation" for s in mine) else None

        spans = receiver.wait_for(whole_trace, timeout_s=30)
    finally:
        fleet.stop()
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not spans:
        print("error: no complete trace arrived", file=sys.stderr)
        return 1
    print(f"\ntrace {spans[0].trace_id} ({len(spans)} spans):\n")
    print(render_tree(span_tree(spans), TRACE_KEYS))
    out.write_text(
        json.dumps(
            [{k: v for k, v in vars(s).items() if k != "children"} for s in spans],
            indent=2,
            default=str,
        )
    )
    print(f"\nspans saved to {out}")
    return 0
