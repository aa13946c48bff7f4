"""Many SIMULATED node agents in one process, for control-plane benchmarks.

``python -m bench.sim_fleet --coordinator HOST:PORT --count N ...``

Each simulated node is a real node agent (its own gRPC server and port, the
real NodeServicer, admission control and Registrar heartbeat stream) whose
runtime is the simulator (node_agent/runtime/simulated.py): it emits tokens
at a fixed rate instead of running a model. Hosting them in one process is
what lets a 2-core machine register a thousand of them; every one of them
reports ``simulated: true``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import grpc

from edgefleet import serving
from edgefleet.model_store import ModelStore
from node_agent.capacity import GpuProbe, HostProbe, ThroughputMeter
from node_agent.daemon import add_node_service
from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from node_agent.node import Node
from node_agent.registrar import Registrar
from node_agent.runtime.simulated import SimulatedRuntime

MODEL = "smollm2-135m"


class SharedHostProbe(HostProbe):
    """One machine under all simulated nodes: read it once a second, not per node."""

    def __init__(self) -> None:
        super().__init__()
        self._cached: tuple[float, object] | None = None

    def read(self):
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > 1.0:
            self._cached = (now, super().read())
        return self._cached[1]


async def start_simulated_node(
    node_id: str,
    coordinators: list[str],
    *,
    tokens_per_s: float,
    cold_start_s: float,
    slots: int,
    queue: int,
    host: HostProbe,
    gpus: GpuProbe,
) -> tuple[grpc.aio.Server, asyncio.Task]:
    throughput = ThroughputMeter()
    runtime = SimulatedRuntime(tokens_per_s=tokens_per_s, cold_start_s=cold_start_s)
    models = ModelManager(
        runtime, ModelStore(), default_slots=slots, queue_limit=queue, default_context=4096
    )
    await models.load(MODEL)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    node = Node(node_id=node_id, models=models, host=host, gpus=gpus, throughput=throughput)
    await add_node_service(server, node, metrics=NodeMetrics())
    await server.start()
    await node.started()
    registrar = Registrar(coordinators, node_id=node_id, advertise=f"127.0.0.1:{port}", node=node)
    return server, asyncio.create_task(registrar.run(), name=f"membership-{node_id}")


async def serve(args: argparse.Namespace) -> None:
    host, gpus = SharedHostProbe(), GpuProbe()
    coordinators = [a for a in args.coordinator.split(",") if a]
    nodes = []
    for index in range(args.count):
        nodes.append(
            await start_simulated_node(
                f"{args.prefix}{index:04d}",
                coordinators,
                tokens_per_s=args.tokens_per_s,
                cold_start_s=args.cold_start_s,
                slots=args.slots,
                queue=args.queue,
                host=host,
                gpus=gpus,
            )
        )
    print(f"simulated nodes ready count={args.count} prefix={args.prefix}", flush=True)
    stop = serving.stop_on_signals()
    await stop.wait()
    for server, membership in nodes:
        membership.cancel()
        await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--prefix", default="sim-")
    parser.add_argument("--tokens-per-s", type=float, default=20.0)
    parser.add_argument("--cold-start-s", type=float, default=0.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--queue", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
