"""Tracing overhead: the same requests with tracing off, recording to a discarding
exporter, and exporting over OTLP to a local receiver.

Three coordinator+node pairs share one etcd (separate key prefixes), one per
mode; requests go to them in turn (off, discard, otlp, off, ...), one at a
time, so machine noise hits every mode alike. Each request streams a
temperature-0 reply of a fixed length through the coordinator; the client
measures tokens/s after the first token and the time to first token.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench import report
from edgefleet.client import FleetClient
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.otlp_receiver import OtlpReceiver
from edgefleet.local.processes import free_port, start_coordinator, start_node

MODES = ("off", "discard", "otlp")
PROMPT = "Write a very long story."


def one_request(client: FleetClient, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    first_tokens = 0
    for chunk in client.complete(
        "smollm2-135m", [("user", PROMPT)], max_tokens=max_tokens, temperature=0
    ):
        if chunk.text:
            tokens += chunk.token_count
            if first is None:
                first, first_tokens = time.perf_counter(), chunk.token_count
    finished = time.perf_counter()
    return (first - started) * 1000, (tokens - first_tokens) / (finished - first)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--full", action="store_true", help="12 rounds of 256 tokens")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.max_tokens = 12, 256
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-tracing-"))
    etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
    receiver = OtlpReceiver().start()
    processes = []
    clients: dict[str, FleetClient] = {}
    try:
        for mode in MODES:
            env = {"OTEL_TRACES_EXPORTER": "none"}
            if mode == "discard":
                env = {"OTEL_TRACES_EXPORTER": "discard"}
            elif mode == "otlp":
                env = receiver.exporter_env()
            coordinator = start_coordinator(
                grpc_address=f"127.0.0.1:{free_port()}",
                etcd=etcd.endpoints,
                extra_args=("--etcd-prefix", f"/bench-{mode}/", "--id", f"coord-{mode}"),
                log_path=workdir / f"coordinator-{mode}.log",
                env=env,
            )
            coordinator.wait_serving(60)
            node = start_node(
                listen=f"127.0.0.1:{free_port()}",
                models="smollm2-135m",
                slots=1,
                extra_args=(
                    "--coordinator",
                    coordinator.address,
                    "--node-id",
                    f"node-{mode}",
                    "--threads",
                    str(os.cpu_count() or 1),
                ),
                log_path=workdir / f"node-{mode}.log",
                env=env,
            )
            node.wait_serving(120)
            processes += [node, coordinator]
            clients[mode] = FleetClient([coordinator.address])
        for mode in MODES:  # joined, and warm
            deadline = time.monotonic() + 30
            while not clients[mode].status().nodes and time.monotonic() < deadline:
                time.sleep(0.1)
            one_request(clients[mode], 8)
        samples: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        for number in range(args.rounds):
            for mode in MODES:
                samples[mode].append(one_request(clients[mode], args.max_tokens))
            print(
                f"round {number + 1}/{args.rounds}: "
                + ", ".join(f"{m} {samples[m][-1][1]:.1f} tok/s" for m in MODES),
                flush=True,
            )
        exported = len(receiver.spans)
    finally:
        for client in clients.values():
            client.close()
        for process in processes:
            process.terminate(15)
        receiver.stop()
        etcd.stop()
    summary = {
        mode: {
            "tokens_per_s": report.median([s[1] for s in runs]),
            "ttft_ms": report.median([s[0] for s in runs]),
        }
        for mode, runs in samples.items()
    }
    base = summary["off"]["tokens_per_s"]
    for mode in MODES:
        summary[mode]["throughput_loss_pct"] = (1 - summary[mode]["tokens_per_s"] / base) * 100
    loss = summary["otlp"]["throughput_loss_pct"]
    result = {
        "settings": vars(args),
        "summary": summary,
        "samples": samples,
        "spans_exported": exported,
        "target": {"otlp_throughput_loss_pct_below": 2.0, "met": loss < 2.0},
    }
    out = report.write("tracing-overhead", result)
    print(
        report.table(
            ["tracing", "tokens/s (median)", "TTFT ms (median)", "throughput loss %"],
            [
                [m, s["tokens_per_s"], s["ttft_ms"], s["throughput_loss_pct"]]
                for m, s in summary.items()
            ],
        )
    )
    print(
        f"OTLP export throughput loss {loss:.2f}% "
        f"(target < 2%: {'met' if loss < 2 else 'NOT met'}); {exported} spans exported"
    )
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
