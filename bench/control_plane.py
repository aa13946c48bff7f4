"""Scenario 4: the control plane at scale, on SIMULATED nodes.

A real etcd and a real coordinator process manage N simulated node agents
(bench.sim_fleet: real gRPC servers, admission and heartbeats; the token
source is a simulator emitting tokens at a fixed rate) while S concurrent
streaming chat sessions run through the coordinator. A few streams go
straight to nodes at the same time, as the baseline for per-token latency.

Measured: registration time, placement decision time (p50/p99, from the
coordinator's ``edgefleet-placement-us`` trailer), per-token latency the
coordinator adds (through-coordinator minus direct, same moment, same
client), coordinator CPU and peak RSS, etcd writes per second (committed
raft proposals), and ``FleetStatus`` (what ``edgefleet status`` calls)
response time with every node listed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import grpc

from bench import report
from bench.sim_harness import (
    MODEL,
    NodeGroup,
    ProcessSampler,
    SimulatedFleet,
    chat_via_coordinator,
    generate_direct,
)
from edgefleet.v1 import coordinator_pb2, coordinator_pb2_grpc

NODES_PER_HOST = 500  # simulated nodes per sim_fleet process


async def run_load(fleet: SimulatedFleet, args, say=print) -> dict:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(fleet.coordinator.address, options=options) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        status = await stub.FleetStatus(coordinator_pb2.FleetStatusRequest())
        addresses = [n.address for n in status.nodes]
        say(f"  creating {args.streams} sessions")
        created = time.perf_counter()
        sessions = []
        for start in range(0, args.streams, 200):
            batch = [
                stub.CreateSession(coordinator_pb2.CreateSessionRequest(model=MODEL))
                for _ in range(min(200, args.streams - start))
            ]
            sessions.extend(await asyncio.gather(*batch))
        create_s = time.perf_counter() - created
        max_tokens = max(2, int(args.tokens_per_s * args.stream_seconds))
        direct_count = max(4, args.streams // 100)
        say(
            f"  {args.streams} streams through the coordinator + {direct_count} direct, "
            f"{max_tokens} tokens each at {args.tokens_per_s:g} tok/s"
        )
        proposals_before = fleet.etcd_proposals()
        window_start = time.monotonic()
        status_ms: list[float] = []
        status_nodes: list[int] = []

        async def probe_status():
            await asyncio.sleep(args.stream_seconds / 3)
            for _ in range(5):
                started = time.perf_counter()
                reply = await stub.FleetStatus(coordinator_pb2.FleetStatusRequest())
                status_ms.append((time.perf_counter() - started) * 1000)
                status_nodes.append(len(reply.nodes))
                await asyncio.sleep(args.stream_seconds / 10)

        async with ProcessSampler(fleet.coordinator.pid) as coordinator_usage:
            results = await asyncio.gather(
                *(chat_via_coordinator(stub, s.session_id, max_tokens) for s in sessions),
                *(
                    generate_direct(random.choice(addresses), max_tokens)
                    for _ in range(direct_count)
                ),
                probe_status(),
            )
        window_s = time.monotonic() - window_start
        proposals = fleet.etcd_proposals() - proposals_before
    via = results[: len(sessions)]
    direct = results[len(sessions) : len(sessions) + direct_count]
    via_latency = [ns / 1e6 for r in via for ns in r.token_latency_ns]
    direct_latency = [ns / 1e6 for r in direct for ns in r.token_latency_ns]
    placement = [r.placement_us for r in via if r.placement_us is not None]
    latency = {
        "via_coordinator_ms": _p(via_latency),
        "direct_ms": _p(direct_latency),
    }
    added = {q: latency["via_coordinator_ms"][q] - latency["direct_ms"][q] for q in ("p50", "p99")}
    return {
        "session_create_s": create_s,
        "streams_ok": sum(r.ok for r in via),
        "stream_errors": sorted({r.error for r in via if not r.ok}),
        "tokens_received": sum(r.tokens for r in via),
        "window_s": window_s,
        "placement_us": _p(placement),
        "token_latency": latency,
        "added_latency_per_token_ms": added,
        "coordinator": {
            "cpu_cores": coordinator_usage.cores,
            "peak_rss_mib": coordinator_usage.peak_rss_mib,
        },
        "etcd_writes_per_s": proposals / window_s,
        "status_ms": _p(status_ms),
        # Nodes each status call listed (fewer than the fleet: some were
        # between losing and renewing their registration).
        "status_nodes_listed": status_nodes,
    }


def _p(values: list[float]) -> dict:
    return {
        "count": len(values),
        "p50": report.percentile(values, 50),
        "p99": report.percentile(values, 99),
        "max": max(values, default=float("nan")),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens-per-s", type=float, default=2.0, help="per stream (simulated)")
    parser.add_argument("--stream-seconds", type=float, default=15.0)
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="coordinator's node heartbeat interval (the node lease TTL is 3x)",
    )
    parser.add_argument("--full", action="store_true", help="1000 nodes, 2000 streams, 30 s")
    parser.add_argument("--smoke", action="store_true", help="tiny size: only checks it runs (CI)")
    args = parser.parse_args(argv)
    if args.full:
        args.nodes, args.streams, args.stream_seconds = 1000, 2000, 30.0
    if args.smoke:
        args.nodes, args.streams, args.stream_seconds = 8, 16, 2.0

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-scale-"))
    groups = []
    for index, start in enumerate(range(0, args.nodes, NODES_PER_HOST)):
        groups.append(
            NodeGroup(
                count=min(NODES_PER_HOST, args.nodes - start),
                tokens_per_s=args.tokens_per_s,
                prefix=f"sim{index}-",
            )
        )
    print(f"SIMULATED runtime: {args.nodes} nodes, {args.streams} streams", flush=True)
    coordinator_args = (
        "--heartbeat-interval",
        str(args.heartbeat_interval),
        "--node-lease-ttl",
        str(3 * args.heartbeat_interval),
    )
    with SimulatedFleet(workdir, groups, coordinator_args=coordinator_args) as fleet:
        ready_s = fleet.wait_ready()
        print(f"  {fleet.size} simulated nodes registered in {ready_s:.1f}s", flush=True)
        measured = asyncio.run(run_load(fleet, args))
    targets = [
        report.target("placement p99 (us)", measured["placement_us"]["p99"], "<", 1000),
        report.target(
            "added latency per token p99 (ms)",
            measured["added_latency_per_token_ms"]["p99"],
            "<",
            2.0,
        ),
        report.target("status with all nodes p99 (ms)", measured["status_ms"]["p99"], "<", 100),
    ]
    result = {
        "runtime": "simulated",
        "settings": vars(args),
        "registration_s": ready_s,
        **measured,
        "targets": targets,
    }
    out = report.write("control-plane", result)
    print(
        report.table(
            ["measure", "value"],
            [
                ["simulated nodes / streams", f"{args.nodes} / {args.streams}"],
                ["streams completed", f"{measured['streams_ok']}/{args.streams}"],
                ["registration (s)", ready_s],
                ["placement p50 / p99 (us)", _pair(measured["placement_us"])],
                [
                    "token latency via coordinator p50 / p99 (ms)",
                    _pair(measured["token_latency"]["via_coordinator_ms"]),
                ],
                [
                    "token latency direct p50 / p99 (ms)",
                    _pair(measured["token_latency"]["direct_ms"]),
                ],
                ["coordinator CPU (cores)", measured["coordinator"]["cpu_cores"]],
                ["coordinator peak RSS (MiB)", measured["coordinator"]["peak_rss_mib"]],
                ["etcd writes/s", measured["etcd_writes_per_s"]],
                ["status p50 / p99 (ms)", _pair(measured["status_ms"])],
                ["nodes listed by status", min(measured["status_nodes_listed"], default=0)],
            ],
        )
    )
    report.print_targets(targets)
    print(f"results: {out}")
    return result


def _pair(stats: dict) -> str:
    return f"{stats['p50']:.3g} / {stats['p99']:.3g}"


if __name__ == "__main__":
    main()
