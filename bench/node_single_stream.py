"""Scenario 1: one stream, edgefleet node vs a direct in-process llama-cpp-python call.

Same model file, prompt, sampling (temperature 0, so both produce the same
tokens) and thread count. The node runs as its own process and is measured
from a gRPC client, so the figure includes everything the node adds: gRPC,
admission, detokenization, the thread hand-off. Runs alternate (direct, node,
direct, node, ...) so that machine noise hits both sides alike; the ratio of
medians is the result.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import grpc
from llama_cpp import Llama

from bench import report
from edgefleet.catalog import CATALOG
from edgefleet.local.processes import free_port, start_node
from edgefleet.model_store import ModelStore
from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

PROMPT = "Write a very long story."  # at temperature 0 SmolLM2 runs to max_tokens
CONTEXT = 2048


def run_direct(llm: Llama, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, decode tokens/s, tokens) for one direct call."""
    started = time.perf_counter()
    first = None
    tokens = 0
    for chunk in llm.create_chat_completion(
        [{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            if first is None:
                first = time.perf_counter()
    finished = time.perf_counter()
    return first - started, (tokens - 1) / (finished - first), tokens


def run_node(stub, max_tokens: int) -> tuple[float, float, int]:
    request = node_pb2.GenerateRequest(
        model="smollm2-135m",
        messages=[common_pb2.ChatMessage(role="user", content=PROMPT)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
    )
    started = time.perf_counter()
    first = None
    tokens = 0
    for chunk in stub.Generate(request):
        if chunk.text:
            tokens += chunk.token_count
            if first is None:
                first = time.perf_counter()
                first_tokens = chunk.token_count
    finished = time.perf_counter()
    return first - started, (tokens - first_tokens) / (finished - first), tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--full", action="store_true", help="10 rounds of 512 tokens")
    parser.add_argument("--smoke", action="store_true", help="tiny size: only checks it runs (CI)")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.max_tokens = 10, 512
    if args.smoke:
        args.rounds, args.max_tokens = 1, 16

    path = ModelStore().pull(CATALOG["smollm2-135m"], progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    address = f"127.0.0.1:{free_port()}"
    node = start_node(
        listen=address,
        models="smollm2-135m",
        slots=1,
        extra_args=("--threads", str(args.threads), "--context", str(CONTEXT)),
        log_path=log_dir / "node.log",
    )
    # Flash attention on both sides (the node always uses it), so both
    # compute the same tokens.
    llm = Llama(str(path), n_ctx=CONTEXT, n_threads=args.threads, flash_attn=True, verbose=False)
    samples: dict[str, list[tuple[float, float, int]]] = {"direct": [], "node": []}
    try:
        node.wait_serving(timeout_s=120)
        with grpc.insecure_channel(address) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            run_direct(llm, 16)  # warm both sides
            run_node(stub, 16)
            for round_index in range(args.rounds):
                samples["direct"].append(run_direct(llm, args.max_tokens))
                samples["node"].append(run_node(stub, args.max_tokens))
                print(
                    f"round {round_index + 1}/{args.rounds}: "
                    f"direct {samples['direct'][-1][1]:.1f} tok/s, "
                    f"node {samples['node'][-1][1]:.1f} tok/s",
                    flush=True,
                )
    finally:
        node.terminate()
        llm.close()

    summary = {
        side: {
            "tokens_per_s": report.median([s[1] for s in runs]),
            "ttft_ms": report.median([s[0] * 1000 for s in runs]),
            "tokens_per_run": report.median([s[2] for s in runs]),
        }
        for side, runs in samples.items()
    }
    ratio = summary["node"]["tokens_per_s"] / summary["direct"]["tokens_per_s"]
    result = {
        "settings": {
            "model": "smollm2-135m",
            "prompt": PROMPT,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "threads": args.threads,
            "temperature": 0,
        },
        "samples": samples,
        "summary": summary,
        "throughput_ratio_node_over_direct": ratio,
        "targets": [report.target("node / direct throughput", ratio, ">=", 0.97)],
    }
    out = report.write("node-single", result)
    print()
    print(
        report.table(
            ["side", "tokens/s (median)", "TTFT ms (median)", "tokens/run"],
            [
                [side, s["tokens_per_s"], s["ttft_ms"], s["tokens_per_run"]]
                for side, s in summary.items()
            ],
        )
    )
    print(
        f"\nnode / direct throughput: {ratio:.3f} (target >= 0.97: "
        f"{'met' if ratio >= 0.97 else 'NOT met'})"
    )
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
