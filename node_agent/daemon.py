"""The node agent process: gRPC server lifecycle, model loading, shutdown.

Start: listen first (health NOT_SERVING, so probes see a starting node), load
the configured models, then SERVING and join the fleet: the
registrar's membership loop runs supervised (``edgefleet.supervise``), and
everything started is undone by one exit stack. SIGTERM/SIGINT: NOT_SERVING,
leave the fleet, stop taking RPCs, give in-flight streams ``shutdown_grace_s``
to finish (then cancel them), unload, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import sys
from pathlib import Path

import grpc

from edgefleet import auth, serving, systemd, telemetry, tls
from edgefleet.errors import EdgefleetError
from edgefleet.model_fetch import ModelFetcher
from edgefleet.model_memory import parse_budget
from edgefleet.model_store import ModelStore
from edgefleet.profile import default_state_dir
from edgefleet.supervise import Supervisor
from edgefleet.v1 import node_pb2, node_pb2_grpc
from node_agent.capacity import GpuProbe, HostProbe, ThroughputMeter, model_memory_total
from node_agent.config import NodeConfig
from node_agent.identity import NodeCredentials, join, keep_renewed
from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from node_agent.node import Node
from node_agent.registrar import Registrar
from node_agent.runtime.base import Runtime
from node_agent.runtime.llama_cpp import LlamaCppRuntime
from node_agent.runtime.simulated import NAME as SIMULATED
from node_agent.runtime.simulated import SimulatedRuntime
from node_agent.service import SERVICE_NAME, NodeServicer

log = logging.getLogger("edgefleet.node")

# Generation streams are long-lived; keep idle connections healthy.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


async def serve(config: NodeConfig, store: ModelStore | None = None) -> int:
    host = HostProbe()
    gpus = GpuProbe()
    throughput = ThroughputMeter()
    runtime = make_runtime(config, throughput, host)
    store = store or ModelStore()
    memory_total, memory_where = model_memory_total(
        runtime.capabilities.gpu_layers, host.read().memory_total_bytes, gpus.read()
    )
    budget = parse_budget(config.memory_budget, memory_total)
    log.info("memory budget for models: %d MiB of %s", budget >> 20, memory_where)
    models = ModelManager(
        runtime,
        store,
        default_slots=config.slots,
        queue_limit=config.queue,
        default_context=config.context_length,
        continuation_slots=config.continuation_slots,
        memory_budget_bytes=budget,
        models_max=config.models_max,
        keep_alive_s=config.keep_alive_s,
        cache_limit_bytes=_cache_limit(config.model_cache_size, store),
    )
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[serving.RequestParseGuard()])
    credentials = None
    if config.insecure or not (config.coordinators or config.join_token):
        if not config.insecure and not tls.is_loopback(config.listen):
            log.error(
                "refusing to start: a standalone node on %s (not loopback) would answer "
                "anyone; join a fleet (--join TOKEN --coordinator ...) or say --insecure",
                config.listen,
            )
            return 2
        port = server.add_insecure_port(config.listen)
    else:
        credentials = await _fleet_identity(config)
        if credentials is None:
            return 1
        port = server.add_secure_port(config.listen, credentials.server_credentials())
    if port == 0:
        log.error("cannot listen on %s", config.listen)
        return 2
    node_id = credentials.node_id if credentials else config.resolved_node_id(port)
    stop = serving.stop_on_signals()
    async with contextlib.AsyncExitStack() as cleanup:
        telemetry.setup_tracing("edgefleet-node", node_id)
        cleanup.callback(telemetry.shutdown_tracing)
        cleanup.callback(gpus.close)
        cleanup.push_async_callback(models.unload_all)
        node = Node(node_id=node_id, models=models, host=host, gpus=gpus, throughput=throughput)
        metrics = NodeMetrics()
        await add_node_service(
            server,
            node,
            metrics=metrics,
            authenticate=coordinator_caller if credentials else None,
            reflect=credentials is None or config.dev,
        )
        metrics.watch(node)
        if config.metrics:
            metrics_port = metrics.serve(config.metrics)
            log.info(
                "metrics at http://%s:%d/metrics", config.metrics.rpartition(":")[0], metrics_port
            )
        await server.start()
        # In-flight streams get the grace period, then are cancelled.
        cleanup.push_async_callback(server.stop, config.shutdown_grace_s)
        address = config.listen.rsplit(":", 1)[0] + f":{port}"
        log.info("node %s listening on %s", node_id, address)
        for name in config.models:
            try:
                # The models given at start stay: no keep-alive, and none of
                # them is evicted for another (the node refuses to start instead).
                await models.load(name, keep_alive_s=None, evict=False)
            except EdgefleetError as error:
                log.error("cannot load model %s: %s", name, error.message)
                return 1
            if stop.is_set():
                break
        await node.started()
        loops = await cleanup.enter_async_context(Supervisor(stop))
        loops.start(
            "idle-models",
            lambda: unload_idle_models(
                node, config.idle_check_s, host, config.battery_keep_alive_s
            ),
            restart=True,
        )
        registrar = None
        if config.coordinators:
            registrar = Registrar(
                list(config.coordinators),
                node_id=node_id,
                advertise=config.advertise or address,
                node=node,
                credentials=credentials,
                labels=credentials.labels if credentials else None,
            )
            loops.start("membership", registrar.run, restart=True)
            models.fetcher = ModelFetcher(
                registrar.fetch_endpoints,
                registrar.channel,
                peer_channel=credentials.peer_channel
                if credentials is not None
                else lambda address, _node_id: grpc.aio.insecure_channel(address),
            )
            if credentials is not None:
                loops.start(
                    "certificate-renewal",
                    lambda: keep_renewed(credentials, registrar.endpoints),
                    restart=True,
                )
        loaded = ",".join(m.name for m in models.hosted())
        # One line on stdout that scripts and tests can wait for.
        print(f"edgefleet node ready id={node_id} address={address} models={loaded}", flush=True)
        systemd.ready(f"serving {address} as {node_id}")  # Type=notify units
        await stop.wait()
        systemd.stopping("draining")
        log.info("shutting down: in-flight streams get %.1fs to finish", config.shutdown_grace_s)
        await node.set_draining(True)
        if registrar is not None:
            await registrar.deregister()  # leave the fleet before the streams end
    if loops.failed:
        log.error("node stopped because its %s loop crashed", loops.failed)
        return 1
    log.info("node %s stopped", node_id)
    return 0


async def unload_idle_models(
    node: Node, interval_s: float, host: HostProbe, battery_keep_alive_s: float | None = None
) -> None:
    """Unload models idle past their keep-alive, every ``interval_s``; on
    battery, past ``battery_keep_alive_s`` when that is sooner."""
    while True:
        await asyncio.sleep(interval_s)
        on_battery = await asyncio.to_thread(lambda: host.power().on_battery)
        cap = battery_keep_alive_s if on_battery else None
        if await node.models.unload_idle(max_idle_s=cap):
            node.capacity_changed.set()  # the fleet hears of it at once


# Every NodeService RPC: coordinators only, except model files, which peers
# (other nodes) fetch.
NODE_POLICIES = {
    name: (auth.NODE if name == "FetchModel" else auth.COORDINATOR)
    for name in node_pb2.DESCRIPTOR.services_by_name["NodeService"].methods_by_name
}


async def coordinator_caller(context) -> auth.Principal | None:
    """The caller of a node RPC, by its verified fleet certificate (the policy
    then admits coordinators only)."""
    peer = tls.peer_identity(context)
    if peer is None:
        return None
    return auth.Principal(peer.role, peer.principal_id, peer.principal_id)


async def _fleet_identity(config: NodeConfig) -> NodeCredentials | None:
    """The node's identity from its state dir, or a new one by joining with the token."""
    state_dir = Path(config.state_dir or default_state_dir() / "node")
    credentials = NodeCredentials.load(state_dir)
    if credentials is not None:
        if config.node_id and config.node_id != credentials.node_id:
            log.warning(
                "the state dir %s holds node %s's identity: --node-id %s is ignored",
                state_dir,
                credentials.node_id,
                config.node_id,
            )
        return credentials
    if not config.join_token:
        log.error(
            "this node has no fleet identity in %s yet: start it once with --join TOKEN "
            "(make one with `edgefleet token create` against the coordinator), or with "
            "--insecure for a coordinator run --insecure",
            state_dir,
        )
        return None
    if not config.coordinators:
        log.error("--join needs --coordinator host:port (a coordinator's client port)")
        return None
    port = int(config.listen.rsplit(":", 1)[1])
    node_id = config.node_id or (f"{socket.gethostname()}-{port}" if port else socket.gethostname())
    try:
        return await join(config.join_token, list(config.coordinators), node_id, state_dir)
    except EdgefleetError as error:
        log.error("cannot join the fleet: %s", error.message)
    except grpc.aio.AioRpcError as error:
        log.error("the coordinator refused the join: %s", error.details())
    except OSError as error:
        log.error("cannot join the fleet: %s", error)
    return None


async def add_node_service(
    server: grpc.aio.Server,
    node: Node,
    *,
    metrics: NodeMetrics | None = None,
    authenticate: auth.Authenticate | None = None,
    reflect: bool = True,
) -> NodeServicer:
    """The node API, health and reflection on ``server`` (every node agent alike).

    Health follows the node: SERVING while it takes new generations. With
    ``authenticate`` (a node in a secure fleet) every RPC is for coordinators.
    """
    health_servicer = serving.add_health_and_reflection(server, SERVICE_NAME, reflect=reflect)

    async def follow(on: bool) -> None:
        await serving.set_serving(health_servicer, SERVICE_NAME, on)

    node.on_serving_change(follow)
    await follow(node.serving)
    servicer = NodeServicer(node, metrics=metrics)
    if authenticate is not None:
        auth.guard(servicer, SERVICE_NAME, NODE_POLICIES, authenticate)
    node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
    return servicer


def make_runtime(config: NodeConfig, throughput: ThroughputMeter, host: HostProbe) -> Runtime:
    if config.runtime == SIMULATED:
        log.warning(
            "SIMULATED runtime: no model, tokens at %.1f/s (benchmarks only)",
            config.sim_tokens_per_s,
        )
        return SimulatedRuntime(
            tokens_per_s=config.sim_tokens_per_s, cold_start_s=config.sim_cold_start_s
        )
    return LlamaCppRuntime(
        threads=config.threads, gpu_layers=config.gpu_layers, throughput=throughput, rss=host.rss
    )


def run(config: NodeConfig) -> int:
    return asyncio.run(serve(config))


if __name__ == "__main__":  # pragma: no cover - use `edgefleet node`
    sys.exit(run(NodeConfig()))


def _cache_limit(text: str, store: ModelStore) -> int | None:
    """--model-cache-size in bytes (a percent is of the store's disk); None: no limit."""
    if not text:
        return None
    store.root.mkdir(parents=True, exist_ok=True)
    return parse_budget(text, shutil.disk_usage(store.root).total)
