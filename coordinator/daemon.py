"""The coordinator process: etcd connection, background loops, gRPC server.

Start: reach etcd (or exit 1 with a clear message), take the replica lease,
mirror the fleet from etcd, then serve. Background work runs as tasks of one
task group: the fleet mirror and the replica lease keepalive. SIGTERM/SIGINT:
NOT_SERVING, stop taking RPCs, let streams finish within the grace period,
give the replica lease back, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

import grpc

from coordinator.completions import Completions
from coordinator.config import CoordinatorConfig
from coordinator.etcd import Etcd
from coordinator.fleet import FleetView
from coordinator.http_app import build_app, http_server
from coordinator.keys import Keys
from coordinator.leader import Leadership
from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.placement import Placement
from coordinator.replica import ReplicaLease
from coordinator.router import NodeChannels, Router
from coordinator.service import SERVICE_NAME, CoordinatorServicer
from coordinator.sessions import SessionLimits, Sessions
from edgefleet import serving, telemetry
from edgefleet.errors import Unavailable
from edgefleet.v1 import coordinator_pb2_grpc

log = logging.getLogger("edgefleet.coordinator")

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


async def _connect_etcd(config: CoordinatorConfig, metrics: CoordinatorMetrics) -> Etcd | None:
    etcd = Etcd(config.etcd, timeout_s=config.etcd_timeout_s, observe=metrics.observe_etcd)
    await etcd.connect()
    deadline = time.monotonic() + config.startup_etcd_wait_s
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


async def serve(config: CoordinatorConfig) -> int:
    metrics = CoordinatorMetrics()
    etcd = await _connect_etcd(config, metrics)
    if etcd is None:
        return 1
    keys = Keys(config.etcd_prefix)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    port = server.add_insecure_port(config.grpc)
    if port == 0:
        log.error("cannot listen on %s", config.grpc)
        await etcd.close()
        return 2
    grpc_address = config.grpc.rsplit(":", 1)[0] + f":{port}"
    coordinator_id = config.coordinator_id or f"{socket.gethostname()}-{port}"
    telemetry.setup_tracing("edgefleet-coordinator", coordinator_id)
    replica = ReplicaLease(
        etcd,
        keys,
        coordinator_id=coordinator_id,
        grpc_address=grpc_address,
        http_address=config.http,
        ttl_s=config.replica_lease_ttl_s,
    )
    fleet = FleetView(etcd, keys)
    leadership = Leadership(etcd, keys, replica)
    channels = NodeChannels()
    membership = Membership(
        etcd,
        keys,
        fleet,
        coordinator_id=coordinator_id,
        lease_ttl_s=config.node_lease_ttl_s,
        heartbeat_interval_s=config.heartbeat_interval_s,
    )
    router = Router(
        fleet,
        Placement(config.policy, sample=config.placement_sample),
        channels,
        first_token_timeout_s=config.first_token_timeout_s,
        stall_timeout_s=config.stall_timeout_s,
        max_failovers=config.max_failovers,
        metrics=metrics,
    )
    completions = Completions(router, metrics)
    servicer = CoordinatorServicer(
        coordinator_id=coordinator_id,
        etcd=etcd,
        keys=keys,
        fleet=fleet,
        membership=membership,
        leadership=leadership,
        sessions=Sessions(
            etcd,
            keys,
            limits=SessionLimits(
                max_messages=config.session_max_messages,
                max_bytes=config.session_max_bytes,
                default_idle_ttl_s=config.session_idle_ttl_s,
            ),
            replica_lease=lambda: replica.lease_id,
            coordinator_id=coordinator_id,
        ),
        router=router,
        completions=completions,
        metrics=metrics,
    )
    metrics.watch(fleet)
    http = None
    if config.http and config.http != "off":
        app = build_app(
            etcd=etcd,
            fleet=fleet,
            metrics=metrics,
            completions=completions,
            api_keys=frozenset(config.api_keys),
            auto_models=dict(config.auto_models),
            keys=keys,
            session_ttl_s=config.session_idle_ttl_s,
        )
        http = http_server(app, config.http)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    health_servicer = serving.add_health_and_reflection(server, SERVICE_NAME)
    stop = serving.stop_on_signals()

    async def set_serving(on: bool) -> None:
        await serving.set_serving(health_servicer, SERVICE_NAME, on)

    await set_serving(False)
    try:
        await replica.acquire()
    except Unavailable as exc:
        log.error("cannot take a replica lease in etcd: %s", exc.message)
        await etcd.close()
        return 1
    await server.start()
    if http is not None:
        if not await http.start():
            log.error("cannot listen for HTTP on %s", config.http)
            await server.stop(0)
            await replica.release()
            await etcd.close()
            return 2
    background = [
        asyncio.create_task(fleet.run(), name="fleet-mirror"),
        asyncio.create_task(replica.run(), name="replica-lease"),
        asyncio.create_task(leadership.run(), name="leadership"),
    ]
    try:
        await asyncio.wait_for(fleet.synced.wait(), config.startup_etcd_wait_s)
        await set_serving(True)
        if http is not None:
            background.append(asyncio.create_task(http.main_loop(), name="http"))
        log.info(
            "coordinator %s serving gRPC on %s (etcd %s, policy %s, pid %d)",
            coordinator_id,
            grpc_address,
            ",".join(config.etcd),
            config.policy,
            os.getpid(),
        )
        print(f"edgefleet coordinator ready id={coordinator_id} grpc={grpc_address}", flush=True)
        await stop.wait()
        log.info("shutting down: streams get %.1fs to finish", config.shutdown_grace_s)
        membership.closing = True  # nodes will move to another replica: keep their leases
        await set_serving(False)
    finally:
        if http is not None:
            await http.stop()
        await server.stop(config.shutdown_grace_s)
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Unavailable):
            await replica.release()
        await channels.close_all()
        await etcd.close()
        telemetry.shutdown_tracing()
    log.info("coordinator %s stopped", coordinator_id)
    return 0


def run(config: CoordinatorConfig) -> int:
    return asyncio.run(serve(config))
