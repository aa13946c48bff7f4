"""Scenario 3: what the coordinator adds on top of the node.

One real node (llama.cpp, the default model) registered with a real
coordinator over a real etcd. The same streams run three ways, interleaved
round by round: straight to the node (gRPC ``Generate``), through the
coordinator's gRPC API (``Complete``) and through its OpenAI-compatible HTTP
API (``/v1/chat/completions``, SSE). Measured: time to first token per
stream (the added p50/p99 is each path's minus the direct path's) and
aggregate tokens/s (ratio to direct).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
import httpx

from bench import report
from bench.streams import read_grpc_stream, read_sse_stream
from edgefleet.catalog import CATALOG
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import free_port, start_coordinator, start_node
from edgefleet.model_store import ModelStore
from edgefleet.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)

MODEL = "smollm2-135m"
PROMPT = "Write a very long story."
PATHS = ("direct", "coordinator gRPC", "coordinator HTTP")


def _messages():
    return [common_pb2.ChatMessage(role="user", content=PROMPT)]


async def direct(channel, max_tokens: int) -> tuple[float, int]:
    stub = node_pb2_grpc.NodeServiceStub(channel)
    started = time.perf_counter()
    call = stub.Generate(
        node_pb2.GenerateRequest(
            model=MODEL,
            messages=_messages(),
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
        )
    )
    return await read_grpc_stream(call, started)


async def via_grpc(channel, max_tokens: int) -> tuple[float, int]:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    started = time.perf_counter()
    call = stub.Complete(
        coordinator_pb2.CompleteRequest(
            model=MODEL,
            messages=_messages(),
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
        )
    )
    return await read_grpc_stream(call, started)


async def via_http(client: httpx.AsyncClient, base: str, max_tokens: int) -> tuple[float, int]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as reply:
        ttft, _, usage_tokens = await read_sse_stream(reply, started)
    # Tokens as the coordinator counted them (include_usage).
    return ttft, usage_tokens or 0


async def run_rounds(node_address, coordinator_address, http_base, args, samples) -> None:
    async with (
        grpc.aio.insecure_channel(node_address) as node_channel,
        grpc.aio.insecure_channel(coordinator_address) as coordinator_channel,
        httpx.AsyncClient(timeout=600) as http,
    ):
        paths = {
            "direct": lambda: direct(node_channel, args.max_tokens),
            "coordinator gRPC": lambda: via_grpc(coordinator_channel, args.max_tokens),
            "coordinator HTTP": lambda: via_http(http, http_base, args.max_tokens),
        }
        for path in paths.values():  # warm up: connections, caches
            await path()
        for round_index in range(args.rounds):
            for name, path in paths.items():
                started = time.perf_counter()
                runs = await asyncio.gather(*(path() for _ in range(args.concurrency)))
                wall = time.perf_counter() - started
                samples[name]["ttft_ms"].extend(r[0] * 1000 for r in runs)
                samples[name]["tokens_per_s"].append(sum(r[1] for r in runs) / wall)
            if (round_index + 1) % 5 == 0 or round_index + 1 == args.rounds:
                print(f"round {round_index + 1}/{args.rounds}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--full", action="store_true", help="40 rounds of 128 tokens")
    parser.add_argument("--smoke", action="store_true", help="tiny size: only checks it runs (CI)")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.max_tokens = 40, 128
    if args.smoke:
        args.rounds, args.max_tokens = 1, 8

    ModelStore().pull(CATALOG[MODEL], progress=False)
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-overhead-"))
    etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
    processes = []
    samples = {name: {"ttft_ms": [], "tokens_per_s": []} for name in PATHS}
    try:
        coordinator = start_coordinator(
            grpc_address=f"127.0.0.1:{free_port()}",
            etcd=etcd.endpoints,
            log_path=workdir / "coordinator.log",
        )
        processes.append(coordinator)
        node_address = f"127.0.0.1:{free_port()}"
        node = start_node(
            listen=node_address,
            models=MODEL,
            slots=max(4, args.concurrency),
            extra_args=(
                "--threads",
                str(args.threads),
                "--coordinator",
                coordinator.address,
            ),
            log_path=workdir / "node.log",
        )
        processes.append(node)
        coordinator.wait_serving(60)
        node.wait_serving(120)
        _wait_registered(coordinator.address)
        http_base = "http://" + coordinator.extra["http"]
        asyncio.run(run_rounds(node_address, coordinator.address, http_base, args, samples))
    finally:
        for process in reversed(processes):
            process.terminate()
        etcd.stop()

    summary = {
        name: {
            "ttft_ms_p50": report.percentile(s["ttft_ms"], 50),
            "ttft_ms_p99": report.percentile(s["ttft_ms"], 99),
            "tokens_per_s": report.median(s["tokens_per_s"]),
        }
        for name, s in samples.items()
    }
    base = summary["direct"]
    added = {
        name: {
            "ttft_ms_p50": summary[name]["ttft_ms_p50"] - base["ttft_ms_p50"],
            "ttft_ms_p99": summary[name]["ttft_ms_p99"] - base["ttft_ms_p99"],
            "throughput_ratio": summary[name]["tokens_per_s"] / base["tokens_per_s"],
        }
        for name in PATHS[1:]
    }
    targets = []
    for name, a in added.items():
        targets += [
            report.target(f"{name} added TTFT p50 (ms)", a["ttft_ms_p50"], "<", 5),
            report.target(f"{name} added TTFT p99 (ms)", a["ttft_ms_p99"], "<", 20),
            report.target(f"{name} throughput ratio", a["throughput_ratio"], ">=", 0.97),
        ]
    result = {
        "settings": vars(args),
        "samples": samples,
        "summary": summary,
        "added_over_direct": added,
        "targets": targets,
    }
    out = report.write("fleet-overhead", result)
    print(
        report.table(
            ["path", "TTFT p50 ms", "TTFT p99 ms", "tokens/s", "added p50", "added p99", "ratio"],
            [
                [
                    name,
                    s["ttft_ms_p50"],
                    s["ttft_ms_p99"],
                    s["tokens_per_s"],
                    added.get(name, {}).get("ttft_ms_p50", 0.0),
                    added.get(name, {}).get("ttft_ms_p99", 0.0),
                    added.get(name, {}).get("throughput_ratio", 1.0),
                ]
                for name, s in summary.items()
            ],
        )
    )
    report.print_targets(targets)
    print(f"results: {out}")
    return result


def _wait_registered(address: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        while time.monotonic() < deadline:
            nodes = stub.FleetStatus(coordinator_pb2.FleetStatusRequest()).nodes
            if any(n.state == common_pb2.NODE_STATE_READY for n in nodes):
                return
            time.sleep(0.2)
    raise TimeoutError("the node did not register with the coordinator")


if __name__ == "__main__":
    main()
