"""Scenario 5: balancing quality on a heterogeneous SIMULATED fleet.

The same fleet shape and the same arrival schedule are replayed once per
placement policy (a fresh coordinator and fresh simulated nodes each time, so
cold nodes are cold again): some nodes generate three times slower than the
others and some start with the model cold (their first generation waits for
a simulated load). Requests arrive as a Poisson process at a fixed share of
the fleet's capacity. Measured per policy: completion time p50/p95 (request
sent to last token) and throughput (tokens/s delivered over the run).
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
from bench.sim_harness import NodeGroup, SimulatedFleet, complete_via_coordinator
from coordinator.placement import POLICIES
from edgefleet.v1 import coordinator_pb2_grpc

FAST_TOKENS_PER_S = 30.0
SLOW_FACTOR = 3.0
SLOTS = 2


def fleet_shape(nodes: int, cold_start_s: float) -> list[NodeGroup]:
    """Half fast, a quarter three times slower, a quarter fast but cold."""
    slow = max(1, nodes // 4)
    cold = max(1, nodes // 4)
    fast = max(1, nodes - slow - cold)
    return [
        NodeGroup(fast, FAST_TOKENS_PER_S, "fast-", slots=SLOTS, queue=32),
        NodeGroup(slow, FAST_TOKENS_PER_S / SLOW_FACTOR, "slow-", slots=SLOTS, queue=32),
        NodeGroup(
            cold, FAST_TOKENS_PER_S, "cold-", cold_start_s=cold_start_s, slots=SLOTS, queue=32
        ),
    ]


def capacity_tokens_per_s(groups: list[NodeGroup]) -> float:
    return sum(g.count * g.slots * g.tokens_per_s for g in groups)


async def replay(address: str, arrivals: list[float], max_tokens: int) -> tuple[list, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        started = time.monotonic()

        async def one(at: float):
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            return await complete_via_coordinator(stub, max_tokens)

        results = await asyncio.gather(*(one(at) for at in arrivals))
        return results, time.monotonic() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--load", type=float, default=0.7, help="share of fleet capacity")
    parser.add_argument("--cold-start-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--full", action="store_true", help="16 nodes, 400 requests")
    parser.add_argument("--smoke", action="store_true", help="tiny size: only checks it runs (CI)")
    args = parser.parse_args(argv)
    if args.full:
        args.nodes, args.requests = 16, 400
    if args.smoke:
        args.nodes, args.requests, args.max_tokens, args.cold_start_s = 4, 12, 10, 1.0

    groups = fleet_shape(args.nodes, args.cold_start_s)
    rate = args.load * capacity_tokens_per_s(groups) / args.max_tokens  # requests/s
    rng = random.Random(args.seed)
    arrivals, at = [], 0.0
    for _ in range(args.requests):
        at += rng.expovariate(rate)
        arrivals.append(at)
    print(
        f"SIMULATED runtime: {sum(g.count for g in groups)} nodes "
        f"({', '.join(f'{g.count} {g.prefix[:-1]}' for g in groups)}), "
        f"{args.requests} requests at {rate:.2f}/s ({args.load:.0%} of capacity)",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-balance-"))
    policies = {}
    for policy in ("round_robin", "least_loaded", "scored"):
        assert policy in POLICIES
        with SimulatedFleet(workdir / policy, groups, policy=policy) as fleet:
            fleet.wait_ready()
            results, elapsed = asyncio.run(
                replay(fleet.coordinator.address, arrivals, args.max_tokens)
            )
        done = [r.total_s for r in results if r.ok]
        policies[policy] = {
            "completed": len(done),
            "errors": sorted({r.error for r in results if not r.ok}),
            "completion_s": {
                "p50": report.percentile(done, 50),
                "p95": report.percentile(done, 95),
                "max": max(done, default=float("nan")),
            },
            "throughput_tokens_per_s": sum(r.tokens for r in results) / elapsed,
        }
        print(
            f"  {policy}: p50 {policies[policy]['completion_s']['p50']:.2f}s, "
            f"p95 {policies[policy]['completion_s']['p95']:.2f}s",
            flush=True,
        )
    ratio = (
        policies["scored"]["completion_s"]["p95"] / policies["round_robin"]["completion_s"]["p95"]
    )
    targets = [report.target("scored p95 / round_robin p95", ratio, "<=", 0.6)]
    result = {
        "runtime": "simulated",
        "settings": vars(args),
        "fleet": [g.__dict__ for g in groups],
        "arrival_rate_per_s": rate,
        "policies": policies,
        "scored_over_round_robin_p95": ratio,
        "targets": targets,
    }
    out = report.write("balancing", result)
    print(
        report.table(
            ["policy", "completed", "p50 (s)", "p95 (s)", "throughput (tok/s)"],
            [
                [
                    name,
                    f"{p['completed']}/{args.requests}",
                    p["completion_s"]["p50"],
                    p["completion_s"]["p95"],
                    p["throughput_tokens_per_s"],
                ]
                for name, p in policies.items()
            ],
        )
    )
    report.print_targets(targets)
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
