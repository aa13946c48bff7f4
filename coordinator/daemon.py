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
import logging
import os
import socket
import time

import grpc

from coordinator.config import CoordinatorConfig
from coordinator.etcd import Etcd
from coordinator.fleet import FleetView
from coordinator.http_app import build_app, http_server
from coordinator.keys import Keys
from coordinator.leader import Leadership
from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.openai_common import HttpServices
from coordinator.placement import Placement
from coordinator.replica import ReplicaLease
from coordinator.router import NodeChannels, Router
from coordinator.service import SERVICE_NAME, CoordinatorServicer
from coordinator.sessions import SessionLimits, Sessions
from coordinator.turns import Turns
from edgefleet import serving, telemetry
from edgefleet.errors import Unavailable
from edgefleet.supervise import Supervisor
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
    async with contextlib.AsyncExitStack() as cleanup:
        etcd = await _connect_etcd(config, metrics)
        if etcd is None:
            return 1
        cleanup.push_async_callback(etcd.close)
        keys = Keys(config.etcd_prefix)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        port = server.add_insecure_port(config.grpc)
        if port == 0:
            log.error("cannot listen on %s", config.grpc)
            return 2
        grpc_address = config.grpc.rsplit(":", 1)[0] + f":{port}"
        coordinator_id = config.coordinator_id or f"{socket.gethostname()}-{port}"
        telemetry.setup_tracing("edgefleet-coordinator", coordinator_id)
        cleanup.callback(telemetry.shutdown_tracing)
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
        cleanup.push_async_callback(channels.close_all)
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
        )
        turns = Turns(router, sessions, fleet, metrics)
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
        if config.http and config.http != "off":
            services = HttpServices(
                turns=turns,
                fleet=fleet,
                sessions=sessions,
                api_keys=frozenset(config.api_keys),
                auto_models=dict(config.auto_models),
            )
            http = http_server(
                build_app(services, metrics=metrics, etcd_ping=etcd.ping), config.http
            )
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
            return 1

        async def give_back_lease() -> None:
            with contextlib.suppress(Unavailable):
                await replica.release()

        cleanup.push_async_callback(give_back_lease)
        await server.start()
        # Stopped before the lease is given back: streams get their grace period.
        cleanup.push_async_callback(server.stop, config.shutdown_grace_s)
        if http is not None:
            if not await http.start():
                log.error("cannot listen for HTTP on %s", config.http)
                return 2
            cleanup.push_async_callback(http.stop)
        loops = await cleanup.enter_async_context(Supervisor(stop))
        loops.start("fleet-mirror", fleet.run, restart=True)
        loops.start("replica-lease", replica.run, restart=True)
        loops.start("leadership", leadership.run, restart=True)
        try:
            await asyncio.wait_for(fleet.synced.wait(), config.startup_etcd_wait_s)
        except TimeoutError:
            log.error("could not read the fleet from etcd in %.0fs", config.startup_etcd_wait_s)
            return 1
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
        print(f"edgefleet coordinator ready id={coordinator_id} grpc={grpc_address}", flush=True)
        await stop.wait()
        log.info("shutting down: streams get %.1fs to finish", config.shutdown_grace_s)
        membership.closing = True  # nodes will move to another replica: keep their leases
        await set_serving(False)
    if loops.failed:
        log.error("coordinator stopped because its %s loop crashed", loops.failed)
        return 1
    log.info("coordinator %s stopped", coordinator_id)
    return 0


def run(config: CoordinatorConfig) -> int:
    return asyncio.run(serve(config))
