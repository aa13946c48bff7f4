"""Coordinator settings: every one has a default; flags and env vars override."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.keys import DEFAULT_PREFIX
from edgefleet import defaults


@dataclass(frozen=True)
class CoordinatorConfig:
    etcd: tuple[str, ...] = ("127.0.0.1:2379",)
    etcd_prefix: str = DEFAULT_PREFIX
    grpc: str = defaults.COORDINATOR_GRPC
    http: str = defaults.COORDINATOR_HTTP
    coordinator_id: str = ""
    policy: str = "scored"
    placement_sample: int = 64
    node_lease_ttl_s: float = 3.0
    heartbeat_interval_s: float = 1.0
    replica_lease_ttl_s: float = 5.0
    session_idle_ttl_s: float = 1800.0
    session_max_messages: int = 512
    session_max_bytes: int = 512 * 1024
    # What one API key may keep in etcd (coordinator.usage; 0: no limit).
    key_max_sessions: int = 1000  # live sessions
    key_max_bytes: int = 64 * 1024 * 1024  # sessions and stored conversations
    etcd_timeout_s: float = 2.0
    startup_etcd_wait_s: float = 10.0
    shutdown_grace_s: float = 10.0
    # Failover: a stream with no token for stall_timeout_s (first token:
    # first_token_timeout_s) moves to another node, at most max_failovers times.
    stall_timeout_s: float = 2.0
    first_token_timeout_s: float = 15.0
    max_failovers: int = 3
    # --- the HTTP listener's connections (coordinator.http_app; 0: off) -----------
    http_header_timeout_s: float = 10.0  # to send a whole request head
    http_idle_timeout_s: float = 5.0  # keep-alive connection without a request
    http_body_timeout_s: float = 30.0  # to send a body, plus 1 s per min-rate bytes
    http_body_min_rate: int = 4096  # bytes/s
    http_max_connections: int = 512  # beyond: 503 with Retry-After, then closed
    # --- per-caller quotas on generations, per replica (coordinator.quotas; 0: off) --
    rate_limit: float = 20.0  # generations/s per API key (keyless loopback: one caller)
    rate_burst: int = 40
    max_streams_per_key: int = 32  # generations in progress at once per API key
    # Bearer keys the HTTP API accepts; empty: no authentication.
    api_keys: tuple[str, ...] = ()
    # "model": "auto" table, task class -> alias (see coordinator.auto_model).
    auto_models: tuple[tuple[str, str], ...] = ()
    # --- security (see README "Security") ----------------------------------------
    # No TLS, no certificates, no checks: the wave-1 fleet, for one trusted machine.
    insecure: bool = False
    # Where nodes register (mutual TLS); "": the --grpc host, port + 1 (0 stays 0).
    node_grpc: str = ""
    state_dir: str = ""  # "": /var/lib/edgefleet/coordinator as root, else per user
    fleet_secret_file: str = ""  # "": <state_dir>/fleet-secret
    tls_ca: str = ""  # the operator's CA (certificate and key) instead of a made one
    tls_ca_key: str = ""
    tls_cert: str = ""  # the HTTP listener's certificate and key (e.g. a public CA's)
    tls_key: str = ""
    tls_auto: bool = False  # HTTPS with a certificate from the fleet CA
    http_keyless_loopback: bool = True  # HTTP on loopback without a key, like Ollama
    cert_ttl_s: float = 86400.0
    audit_retention_s: float = 30 * 86400.0
    dev: bool = False  # gRPC reflection, /docs and /openapi.json
    etcd_cacert: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    # Node bundles (`edgefleet bundle`) served to joining devices (coordinator.deploy_routes).
    bundle_dir: str = ""
    # Files of the models operators add (`edgefleet models add`); "": <state_dir>/models.
    model_dir: str = ""
