"""Node agent settings: every one has a default, flags and env vars override."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from edgefleet import defaults


@dataclass(frozen=True)
class NodeConfig:
    listen: str = defaults.NODE_LISTEN
    models: tuple[str, ...] = (defaults.DEFAULT_MODEL,)
    # Slots are sequences in one batched context: cheap (KV cache only).
    slots: int = 4
    queue: int = 16
    # Extra slots per model kept for replies continued after a failure on
    # another node, so they restart at once on a full fleet (one KV stream each).
    continuation_slots: int = 1
    context_length: int = 2048
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    gpu_layers: int = 0
    # --- memory and idle models (README: "Memory and idle models") ----------------
    # Bytes ("4GiB") or a percent of the host's memory ("80%").
    memory_budget: str = "80%"
    models_max: int = 3
    # Most disk for model files: bytes or a percent of the store's disk ("": no limit).
    model_cache_size: str = ""
    # Idle seconds before a model loaded on demand is unloaded (None: never);
    # the models given at start (--models) are kept.
    keep_alive_s: float | None = 300.0
    idle_check_s: float = 10.0
    # On battery, models loaded on demand go after this much idle time (None: as on mains).
    battery_keep_alive_s: float | None = 60.0
    node_id: str = ""
    shutdown_grace_s: float = 10.0
    # Coordinators to register with (none: a standalone node).
    coordinators: tuple[str, ...] = ()
    # Address coordinators use to reach this node (default: the listen address).
    advertise: str = ""
    # host:port of the Prometheus /metrics listener (empty: not served).
    metrics: str = ""
    # "llama.cpp", or "simulated": a token emitter for control-plane
    # benchmarks only (no model; the node reports itself as simulated).
    runtime: str = "llama.cpp"
    sim_tokens_per_s: float = 20.0
    sim_cold_start_s: float = 0.0
    # --- security (README: Security) ----------------------------------------------
    # Plaintext, no certificates: only with a coordinator run --insecure.
    insecure: bool = False
    join_token: str = ""  # joins the fleet once; the identity then lives in state_dir
    state_dir: str = ""  # "": /var/lib/edgefleet/node as root, else per user
    dev: bool = False  # gRPC reflection

    def resolved_node_id(self, port: int) -> str:
        return self.node_id or f"{socket.gethostname()}-{port}"
