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
import sys

import grpc

from edgefleet import serving, telemetry
from edgefleet.errors import EdgefleetError
from edgefleet.supervise import Supervisor
from edgefleet.v1 import node_pb2_grpc
from node_agent.capacity import GpuProbe, HostProbe, ThroughputMeter
from node_agent.config import NodeConfig
from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from node_agent.node import Node
from node_agent.registrar import Registrar
from node_agent.runtime.base import Runtime
from node_agent.runtime.llama_cpp import LlamaCppRuntime
from node_agent.runtime.simulated import NAME as SIMULATED
from node_agent.runtime.simulated import SimulatedRuntime
from node_agent.service import SERVICE_NAME, NodeServicer
from node_agent.store import ModelStore

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
    models = ModelManager(
        runtime,
        store or ModelStore(),
        default_slots=config.slots,
        queue_limit=config.queue,
        default_context=config.context_length,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    port = server.add_insecure_port(config.listen)
    if port == 0:
        log.error("cannot listen on %s", config.listen)
        return 2
    node_id = config.resolved_node_id(port)
    stop = serving.stop_on_signals()
    async with contextlib.AsyncExitStack() as cleanup:
        telemetry.setup_tracing("edgefleet-node", node_id)
        cleanup.callback(telemetry.shutdown_tracing)
        cleanup.callback(gpus.close)
        cleanup.push_async_callback(models.unload_all)
        node = Node(node_id=node_id, models=models, host=host, gpus=gpus, throughput=throughput)
        metrics = NodeMetrics()
        await add_node_service(server, node, metrics=metrics)
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
                await node.load_model(name)
            except EdgefleetError as error:
                log.error("cannot load model %s: %s", name, error.message)
                return 1
            if stop.is_set():
                break
        await node.started()
        loops = await cleanup.enter_async_context(Supervisor(stop))
        registrar = None
        if config.coordinators:
            registrar = Registrar(
                list(config.coordinators),
                node_id=node_id,
                advertise=config.advertise or address,
                node=node,
            )
            loops.start("membership", registrar.run, restart=True)
        loaded = ",".join(m.name for m in models.hosted())
        # One line on stdout that scripts and tests can wait for.
        print(f"edgefleet node ready id={node_id} address={address} models={loaded}", flush=True)
        await stop.wait()
        log.info("shutting down: in-flight streams get %.1fs to finish", config.shutdown_grace_s)
        await node.set_draining(True)
        if registrar is not None:
            await registrar.deregister()  # leave the fleet before the streams end
    if loops.failed:
        log.error("node stopped because its %s loop crashed", loops.failed)
        return 1
    log.info("node %s stopped", node_id)
    return 0


async def add_node_service(
    server: grpc.aio.Server, node: Node, *, metrics: NodeMetrics | None = None
) -> NodeServicer:
    """The node API, health and reflection on ``server`` (every node agent alike).

    Health follows the node: SERVING while it takes new generations.
    """
    health_servicer = serving.add_health_and_reflection(server, SERVICE_NAME)

    async def follow(on: bool) -> None:
        await serving.set_serving(health_servicer, SERVICE_NAME, on)

    node.on_serving_change(follow)
    await follow(node.serving)
    servicer = NodeServicer(node, metrics=metrics)
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
