"""Fleet start-up and placement on a real local fleet.

Starts etcd, a coordinator and N real node processes exactly as
``edgefleet up`` does, and measures how long the fleet takes to be ready
(every node registered and visible). Then it runs chat turns through the
coordinator, sequential and concurrent, and reads the placement decision time
the coordinator reports for each (gRPC trailer ``edgefleet-placement-us``).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench import report
from edgefleet.local.processes import free_port
from edgefleet.local.up import start_fleet
from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc


def chat_turn(stub, session_id: str, placement_us: list[float]) -> str:
    call = stub.Chat(
        coordinator_pb2.ChatRequest(
            session_id=session_id,
            content="Say hello in three words.",
            sampling=common_pb2.SamplingParams(max_tokens=8),
        )
    )
    node = ""
    for chunk in call:
        node = chunk.node_id or node
    for key, value in call.trailing_metadata():
        if key == "edgefleet-placement-us":
            placement_us.append(float(value))
    return node


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="3 nodes, 24 sessions x 5 turns")
    args = parser.parse_args(argv)
    if args.full:
        args.nodes, args.sessions, args.turns = 3, 24, 5

    grpc_address = f"127.0.0.1:{free_port()}"
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-fleet-"))
    started = time.perf_counter()
    fleet = start_fleet(
        nodes=args.nodes,
        model="smollm2-135m",
        grpc_address=grpc_address,
        http_address=f"127.0.0.1:{free_port()}",
        slots=2,
        workdir=workdir,
        say=lambda _: None,
    )
    ready_s = time.perf_counter() - started
    print(f"fleet of {args.nodes} node(s) ready in {ready_s:.2f}s", flush=True)
    placement_us: list[float] = []
    nodes_used: dict[str, int] = {}
    try:
        with grpc.insecure_channel(grpc_address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            sessions = [
                stub.CreateSession(coordinator_pb2.CreateSessionRequest(model="smollm2-135m"))
                for _ in range(args.sessions)
            ]

            def converse(session):
                for _ in range(args.turns):
                    node = chat_turn(stub, session.session_id, placement_us)
                    nodes_used[node] = nodes_used.get(node, 0) + 1

            threads = [threading.Thread(target=converse, args=(s,)) for s in sessions]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        fleet.stop()
    result = {
        "settings": vars(args),
        "fleet_ready_s": ready_s,
        "placement_us": {
            "count": len(placement_us),
            "p50": report.percentile(placement_us, 50),
            "p99": report.percentile(placement_us, 99),
            "max": max(placement_us, default=float("nan")),
        },
        "turns_per_node": nodes_used,
    }
    out = report.write("fleet-placement", result)
    print(
        report.table(
            [
                "fleet ready (s)",
                "placements",
                "placement p50 (us)",
                "placement p99 (us)",
                "turns/node",
            ],
            [
                [
                    ready_s,
                    len(placement_us),
                    result["placement_us"]["p50"],
                    result["placement_us"]["p99"],
                    str(nodes_used),
                ]
            ],
        )
    )
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
