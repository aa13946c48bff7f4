"""A misbehaving node for one test: it registers like a real node, then answers
Generate with chunks out of order. The coordinator must treat it as failed.

Run: python -m tests.rogue_node LISTEN COORDINATOR NODE_ID
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

MODEL = "smollm2-135m"


def capacity() -> common_pb2.Capacity:
    return common_pb2.Capacity(
        cpu_count=1,
        slots_total=8,
        slots_free=8,
        queue_limit=8,
        tokens_per_second=1e6,  # looks like the best node there is
        models=[common_pb2.LoadedModel(alias=MODEL, slots_total=8, slots_free=8, queue_limit=8)],
    )


class RogueNode(node_pb2_grpc.NodeServiceServicer):
    async def Generate(self, request, context):
        yield node_pb2.GenerateChunk(seq=0, node_id=NODE_ID)
        yield node_pb2.GenerateChunk(seq=1, text="Once", token_count=1, node_id=NODE_ID)
        await asyncio.sleep(1.0)  # time for the test to open a way out
        yield node_pb2.GenerateChunk(seq=7, text=" garbage", token_count=1, node_id=NODE_ID)
        await asyncio.sleep(30)


async def main(listen: str, coordinator: str) -> None:
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServiceServicer_to_server(RogueNode(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(listen)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        reply = await stub.Register(
            coordinator_pb2.RegisterRequest(
                node_id=NODE_ID,
                address=listen,
                models=[MODEL],
                capacity=capacity(),
                pid=os.getpid(),
            )
        )

        async def beats():
            while True:
                yield coordinator_pb2.HeartbeatRequest(
                    node_id=NODE_ID,
                    epoch=reply.epoch,
                    capacity=capacity(),
                    state=common_pb2.NODE_STATE_READY,
                )
                await asyncio.sleep(0.5)

        async for _ in stub.Heartbeat(beats()):
            pass


if __name__ == "__main__":
    listen, coordinator, NODE_ID = sys.argv[1:4]
    asyncio.run(main(listen, coordinator))
