"""The coordinator process: etcd connection, background loops, gRPC server.

Start: reach etcd (or exit 1 with a clear message), take the replica lease,
mirror the fleet from etcd, then serve. The long-lived loops (fleet mirror,
replica lease keepalive, leadership, the HTTP server) run supervised in one
task group (``edgefleet.supervise``); everything started is undone by one
exit stack, in reverse order. SIGTERM/SIGINT: NOT_SERVING, stop taking RPCs,
let streams finish within the grace period, give the replica lease back,
exit 0 (1 if a loop that the daemon cannot live without crashed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import grpc

from coordinator import security
from coordinator.access import Access
from coordinator.access_service import SERVICE_NAME as ACCESS_SERVICE_NAME
from coordinator.access_service import AccessServicer
from coordinator.config import CoordinatorConfig
from coordinator.deploy_routes import DeploySettings
from coordinator.deployments import Deployments
from coordinator.etcd import Etcd, EtcdTls
from coordinator.fleet import FleetView
from coordinator.http_app import HttpLimits, build_app, http_server
from coordinator.keys import Keys
from coordinator.leader import Leadership
from coordinator.loop_watch import LeaseKeeper, LoopClock
from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.model_registry import ModelRegistry
from coordinator.model_service import SERVICE_NAME as MODEL_SERVICE_NAME
from coordinator.model_service import ModelServicer
from coordinator.openai_common import HttpServices
from coordinator.placement import Placement
from coordinator.quotas import QuotaLimits, Quotas
from coordinator.replica import ReplicaLease
from coordinator.replica_files import ReplicaFiles
from coordinator.router import NodeChannels, Router
from coordinator.service import SERVICE_NAME, CoordinatorServicer
from coordinator.sessions import SessionLimits, Sessions
from coordinator.turns import Turns
from coordinator.usage import StorageLimits
from edgefleet import auth, serving, systemd, telemetry, tls
from edgefleet.errors import Unavailable
from edgefleet.model_store import ModelStore
from edgefleet.profile import default_state_dir
from edgefleet.supervise import Supervisor
from edgefleet.v1 import access_pb2_grpc, coordinator_pb2_grpc, models_pb2_grpc

log = logging.getLogger("edgefleet.coordinator")

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def etcd_tls_of(config: CoordinatorConfig) -> EtcdTls | None:
    return EtcdTls.from_files(config.etcd_cacert, config.etcd_cert, config.etcd_key)


async def _connect_etcd(config: CoordinatorConfig, metrics: CoordinatorMetrics) -> Etcd | None:
    deadline = time.monotonic() + config.startup_etcd_wait_s
    while True:
        try:
            etcd = Etcd(
                config.etcd,
                timeout_s=config.etcd_timeout_s,
                observe=metrics.observe_etcd,
                tls=etcd_tls_of(config),
            )
            break
        except ValueError as exc:  # a name not (yet) in DNS: etcd's pods may still start
            if time.monotonic() >= deadline:
                log.error("%s", exc)
                return None
            await asyncio.sleep(0.5)
    await etcd.connect()
    while True:
        try:
            await etcd.ping()
            return etcd
        except Unavailable as exc:
            if time.monotonic() >= deadline:
                log.error(
                    "cannot reach etcd at %s after %.0fs: %s",
                    ",".join(config.etcd),
                    config.startup_etcd_wait_s,
                    exc.message,
                )
                await etcd.close()
                return None
            await asyncio.sleep(0.5)


def _coordinator_id(config: CoordinatorConfig) -> str:
    port = int(config.grpc.rsplit(":", 1)[1])
    return config.coordinator_id or f"{socket.gethostname()}-{port or uuid.uuid4().hex[:6]}"


async def serve(config: CoordinatorConfig) -> int:
    problems = security.posture_problems(config)
    if problems:
        for problem in problems:
            log.error("refusing to start: %s", problem)
        return 2
    if config.insecure:
        log.warning(
            "--insecure: no TLS, no node certificates, no API key checks on gRPC; "
            "anyone who reaches these ports can join the fleet or call it"
        )
    metrics = CoordinatorMetrics()
    async with contextlib.AsyncExitStack() as cleanup:
        etcd = await _connect_etcd(config, metrics)
        if etcd is None:
            return 1
        cleanup.push_async_callback(etcd.close)
        keys = Keys(config.etcd_prefix)
        coordinator_id = _coordinator_id(config)
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[serving.RequestParseGuard()])
        node_server = None
        own = ca = None
        node_address = ""
        if config.insecure:
            port = server.add_insecure_port(config.grpc)
        else:
            state_dir = Path(config.state_dir or default_state_dir() / "coordinator")
            try:
                ca = await security.load_ca(
                    etcd,
                    keys,
                    secret_file=Path(config.fleet_secret_file or state_dir / "fleet-secret"),
                    ca_file=config.tls_ca,
                    ca_key_file=config.tls_ca_key,
                )
            except (security.FleetSecretMissing, ValueError, OSError) as error:
                log.error("cannot open the fleet CA: %s", error)
                return 1
            node_listen = security.node_listen_address(config)
            hosts = security.certificate_hosts(config.grpc, config.http, node_listen)
            own = security.own_certificate(ca, coordinator_id, hosts, config.cert_ttl_s)
            port = server.add_secure_port(
                config.grpc, own.server_credentials(require_client_auth=False)
            )
            node_server = grpc.aio.server(
                options=SERVER_OPTIONS, interceptors=[serving.RequestParseGuard()]
            )
            node_port = node_server.add_secure_port(
                node_listen, own.server_credentials(require_client_auth=True)
            )
            if node_port == 0:
                log.error("cannot listen for nodes on %s", node_listen)
                return 2
            node_address = node_listen.rsplit(":", 1)[0] + f":{node_port}"
        if port == 0:
            log.error("cannot listen on %s", config.grpc)
            return 2
        grpc_address = config.grpc.rsplit(":", 1)[0] + f":{port}"
        telemetry.setup_tracing("edgefleet-coordinator", coordinator_id)
        cleanup.callback(telemetry.shutdown_tracing)
        replica = ReplicaLease(
            etcd,
            keys,
            coordinator_id=coordinator_id,
            grpc_address=grpc_address,
            http_address=config.http,
            node_address=node_address,
            ttl_s=config.replica_lease_ttl_s,
        )
        fleet = FleetView(etcd, keys)
        leadership = Leadership(etcd, keys, replica)
        access = None
        if own is not None:
            access = Access(
                etcd,
                keys,
                ca,
                cert_ttl_s=config.cert_ttl_s,
                audit_retention_s=config.audit_retention_s,
                node_endpoints=replica.node_endpoints,
            )
        channels = NodeChannels(own.channel_credentials if own is not None else None)
        cleanup.push_async_callback(channels.close_all)
        if own is not None:
            own.listeners.append(channels.renewed)
        # This replica's own stalls must not evict the nodes it serves.
        clock = LoopClock(observe=metrics.loop_lag.set)
        membership = Membership(
            etcd,
            keys,
            fleet,
            coordinator_id=coordinator_id,
            lease_ttl_s=config.node_lease_ttl_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
            admit=access.check_may_register if access is not None else None,
            node_endpoints=replica.node_endpoints if access is not None else None,
            clock=clock,
        )
        registry = ModelRegistry(
            etcd,
            keys,
            Path(
                config.model_dir
                or Path(config.state_dir or default_state_dir() / "coordinator") / "models"
            ),
            ModelStore(),
        )
        replica_files = ReplicaFiles(
            registry,
            replica.replicas,
            coordinator_id=coordinator_id,
            channel=functools.partial(_replica_channel, own),
        )
        router = Router(
            fleet,
            Placement(config.policy, sample=config.placement_sample),
            channels,
            first_token_timeout_s=config.first_token_timeout_s,
            stall_timeout_s=config.stall_timeout_s,
            max_failovers=config.max_failovers,
            metrics=metrics,
            registry=registry,
        )
        sessions = Sessions(
            etcd,
            keys,
            limits=SessionLimits(
                max_messages=config.session_max_messages,
                max_bytes=config.session_max_bytes,
                default_idle_ttl_s=config.session_idle_ttl_s,
            ),
            replica_lease=lambda: replica.lease_id,
            coordinator_id=coordinator_id,
            storage=StorageLimits(
                max_sessions=config.key_max_sessions, max_bytes=config.key_max_bytes
            ),
        )
        quotas = Quotas(
            QuotaLimits(
                rate_per_s=config.rate_limit,
                burst=config.rate_burst,
                max_concurrent=config.max_streams_per_key,
            )
        )
        turns = Turns(router, sessions, fleet, metrics, quotas=quotas)
        servicer = CoordinatorServicer(
            coordinator_id=coordinator_id,
            replica=replica,
            fleet=fleet,
            membership=membership,
            leadership=leadership,
            sessions=sessions,
            router=router,
            turns=turns,
        )
        metrics.watch(fleet)
        http = None
        http_url = ""
        if config.http and config.http != "off":
            services = HttpServices(
                turns=turns,
                fleet=fleet,
                sessions=sessions,
                api_keys=frozenset(config.api_keys),
                auto_models=dict(config.auto_models),
                access=access,
                keyless=config.http_keyless_loopback and tls.is_loopback(config.http),
            )
            ssl_files = None
            if own is not None and (config.tls_cert or config.tls_auto):
                ssl_files = (config.tls_cert, config.tls_key)
                if config.tls_auto:
                    ssl_files = security.write_http_tls_files(own, state_dir)
            limits = HttpLimits(
                header_timeout_s=config.http_header_timeout_s,
                idle_timeout_s=config.http_idle_timeout_s,
                body_timeout_s=config.http_body_timeout_s,
                body_min_rate=config.http_body_min_rate,
                max_connections=config.http_max_connections,
            )
            http = http_server(
                build_app(
                    services,
                    metrics=metrics,
                    etcd_ping=etcd.ping,
                    dev=config.dev,
                    limits=limits,
                    deploy=DeploySettings(
                        bundle_dir=config.bundle_dir,
                        grpc_port=port,
                        ca_pem=ca.cert_pem if ca is not None and config.tls_auto else b"",
                    ),
                ),
                config.http,
                ssl_files=ssl_files,
                limits=limits,
            )
            http_url = ("https://" if ssl_files else "http://") + config.http
            if own is not None and config.tls_auto:
                own.listeners.append(
                    lambda: http.reload_certificate(*security.write_http_tls_files(own, state_dir))
                )
        servicer = CoordinatorServicer(
            coordinator_id=coordinator_id,
            replica=replica,
            fleet=fleet,
            membership=membership,
            leadership=leadership,
            sessions=sessions,
            router=router,
            turns=turns,
        )
        deployments = Deployments(etcd, keys, fleet, registry, channels, leadership)
        models = ModelServicer(
            registry, deployments, audit=access.audit if access is not None else None
        )
        reflect = config.insecure or config.dev
        if access is None:
            coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
            models_pb2_grpc.add_ModelServiceServicer_to_server(models, server)
            health_servicer = serving.add_health_and_reflection(
                server, SERVICE_NAME, MODEL_SERVICE_NAME, reflect=reflect
            )
        else:
            _add_guarded(
                server,
                security.CLIENT_POLICIES,
                security.client_authenticator(access, frozenset(config.api_keys)),
                servicer,
                AccessServicer(access),
                models,
                not_here=security.NODES_REGISTER_ELSEWHERE,
            )
            _add_guarded(
                node_server,
                security.NODE_POLICIES,
                security.node_authenticator(access),
                servicer,
                AccessServicer(access),
                models,
                not_here="the node listener serves nodes only; clients call the client port",
            )
            health_servicer = serving.add_health_and_reflection(
                server, SERVICE_NAME, ACCESS_SERVICE_NAME, MODEL_SERVICE_NAME, reflect=reflect
            )
            serving.add_health_and_reflection(node_server, reflect=False)
        stop = serving.stop_on_signals()

        async def set_serving(on: bool) -> None:
            await serving.set_serving(health_servicer, SERVICE_NAME, on)

        await set_serving(False)
        try:
            await replica.acquire()
        except Unavailable as exc:
            log.error("cannot take a replica lease in etcd: %s", exc.message)
            return 1

        async def give_back_lease() -> None:
            with contextlib.suppress(Unavailable):
                await replica.release()

        cleanup.push_async_callback(give_back_lease)
        await server.start()
        # Stopped before the lease is given back: streams get their grace period.
        cleanup.push_async_callback(server.stop, config.shutdown_grace_s)
        if node_server is not None:
            await node_server.start()
            cleanup.push_async_callback(node_server.stop, config.shutdown_grace_s)
        if http is not None:
            if not await http.start():
                log.error("cannot listen for HTTP on %s", config.http)
                return 2
            cleanup.push_async_callback(http.stop)
        loops = await cleanup.enter_async_context(Supervisor(stop))
        loops.start("loop-clock", clock.run, restart=True)
        keeper = LeaseKeeper(
            clock,
            membership.live_leases,
            lambda: Etcd(config.etcd, timeout_s=config.etcd_timeout_s, tls=etcd_tls_of(config)),
            lease_ttl_s=config.node_lease_ttl_s,
        )
        keeper.start()
        cleanup.callback(keeper.stop)
        loops.start("fleet-mirror", fleet.run, restart=True)
        loops.start("model-registry", registry.run, restart=True)
        loops.start("replica-files", replica_files.run, restart=True)
        loops.start("deployments", deployments.run_mirror, restart=True)
        loops.start("deployment-reconciler", deployments.run_reconciler, restart=True)
        loops.start("replica-lease", replica.run, restart=True)
        loops.start("leadership", leadership.run, restart=True)
        if access is not None:

            async def cut_off(node_id: str) -> None:
                channels.forget_node(node_id)
                await membership.cut_off(node_id)

            # A revoked node leaves now; supervised, so a failure (etcd away)
            # is logged at once and retried until the registration is gone.
            access.on_revoked(
                lambda node_id: loops.start(
                    f"cut-off {node_id}", lambda: cut_off(node_id), restart=True
                )
            )
            loops.start("access-mirror", access.run, restart=True)
            loops.start(
                "own-certificate",
                lambda: security.keep_renewed(own, ca, coordinator_id, hosts, config.cert_ttl_s),
                restart=True,
            )
        try:
            await asyncio.wait_for(fleet.synced.wait(), config.startup_etcd_wait_s)
        except TimeoutError:
            log.error("could not read the fleet from etcd in %.0fs", config.startup_etcd_wait_s)
            return 1
        if access is not None:
            await security.write_admin_profile(
                access,
                state_dir / "admin-profile.json",
                coordinator_id=coordinator_id,
                grpc_address=grpc_address,
                http_url=http_url,
            )
        await set_serving(True)
        if http is not None:
            loops.start("http", http.main_loop, restart=False)
        log.info(
            "coordinator %s serving gRPC on %s (etcd %s, policy %s, pid %d)",
            coordinator_id,
            grpc_address,
            ",".join(config.etcd),
            config.policy,
            os.getpid(),
        )
        ready = f"edgefleet coordinator ready id={coordinator_id} grpc={grpc_address}"
        if node_address:
            ready += f" nodes={node_address} profile={state_dir / 'admin-profile.json'}"
        print(ready, flush=True)
        systemd.ready(f"serving gRPC on {grpc_address}")  # Type=notify units
        await stop.wait()
        systemd.stopping("draining")
        log.info("shutting down: streams get %.1fs to finish", config.shutdown_grace_s)
        membership.closing = True  # nodes will move to another replica: keep their leases
        await set_serving(False)
    if loops.failed:
        log.error("coordinator stopped because its %s loop crashed", loops.failed)
        return 1
    log.info("coordinator %s stopped", coordinator_id)
    return 0


def _add_guarded(
    server, policies, authenticate, coordinator, access, models, *, not_here: str
) -> None:
    """The services on one listener, every RPC behind the listener's policy table."""
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        auth.guard(
            _copy(coordinator),
            SERVICE_NAME,
            policies[SERVICE_NAME],
            authenticate,
            not_here=not_here,
        ),
        server,
    )
    access_pb2_grpc.add_AccessServiceServicer_to_server(
        auth.guard(
            _copy(access),
            ACCESS_SERVICE_NAME,
            policies[ACCESS_SERVICE_NAME],
            authenticate,
            not_here=not_here,
        ),
        server,
    )
    models_pb2_grpc.add_ModelServiceServicer_to_server(
        auth.guard(
            _copy(models),
            MODEL_SERVICE_NAME,
            policies[MODEL_SERVICE_NAME],
            authenticate,
            not_here=not_here,
        ),
        server,
    )


def _replica_channel(own: security.OwnCertificate | None, address: str) -> grpc.aio.Channel:
    """A channel to another replica's node listener (its coordinator
    certificate presented), or to its one port in an insecure fleet."""
    if own is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(
        address, own.channel_credentials(), options=tls.channel_options(tls.COORDINATOR_DNS)
    )


def _copy(servicer):
    """A shallow copy, so each listener wraps its own methods around one state."""
    import copy

    return copy.copy(servicer)


def run(config: CoordinatorConfig) -> int:
    return asyncio.run(serve(config))
