"""Fleet models: cold loads on demand, memory estimates, fan-out of a file.

A real fleet (etcd, one coordinator, three node processes, each node with its
own model store holding only smollm2-135m) measures:

- **cold load on demand**: request to first token for a model that no node
  has loaded, when a node already has the file (gemma3-270m, in node-1's
  store) and when the file must first come from the coordinator (the same
  GGUF added to the registry under another alias, so no node has it);
- **memory estimate error**: what the node estimates from the GGUF header
  before a load (default slots and context) against the resident memory the
  load measurably added, per model;
- **fan-out** of a 98 MB file to three nodes: (a) the coordinator alone
  sending three copies at once (three fetchers with the node's code, in this
  process, against the coordinator); (b) ``models deploy --replicas all`` as a
  fleet does it: one node fetches from the coordinator, the other two then
  from that node (peers), until all three have it loaded; the coordinator
  sends one copy. On one machine the link is loopback, so (b) is not faster
  here; what it saves is the coordinator's uplink, N-1 copies of the file.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc

from bench import report
from edgefleet.catalog import CATALOG
from edgefleet.client import FleetClient
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import free_port, start_coordinator, start_node
from edgefleet.model_fetch import ModelFetcher
from edgefleet.model_store import ModelStore
from edgefleet.v1 import models_pb2, models_pb2_grpc

NODES = 3
SMOLLM, GEMMA = CATALOG["smollm2-135m"], CATALOG["gemma3-270m"]


def _store(root: Path, *entries) -> Path:
    """A node's own store with links to this machine's cached files."""
    source = ModelStore()
    for entry in entries:
        (root / entry.alias).mkdir(parents=True, exist_ok=True)
        (root / entry.alias / entry.file_name).symlink_to(source.pull(entry, progress=False))
    return root


def _first_token_s(client: FleetClient, model: str) -> float:
    started = time.perf_counter()
    for chunk in client.complete(model, [("user", "Hello")], max_tokens=4, temperature=0):
        if chunk.text:
            return time.perf_counter() - started
    raise RuntimeError(f"{model}: no text")


def _nodes_with(client: FleetClient, alias: str) -> dict[str, object]:
    return {
        n.node_id: m for n in client.status().nodes for m in n.capacity.models if m.alias == alias
    }


async def _fetch_copies(address: str, folder: Path, copies: int) -> float:
    """Seconds for ``copies`` fetchers (the node's code) to get the fan-out
    model from the coordinator at once."""
    with grpc.insecure_channel(address) as channel:
        registered = models_pb2_grpc.ModelServiceStub(channel).ListRegistry(
            models_pb2.ListRegistryRequest()
        )
    source = next(m for m in registered.models if m.alias == "fan-out").variants[0]
    fetchers = [
        ModelFetcher(lambda: [address], lambda a: grpc.aio.insecure_channel(a))
        for _ in range(copies)
    ]
    started = time.perf_counter()
    await asyncio.gather(
        *(
            f.fetch("fan-out", source, folder / str(i) / f"{source.sha256}.gguf")
            for i, f in enumerate(fetchers)
        )
    )
    return time.perf_counter() - started


def _fetch_sources(workdir: Path) -> dict[str, str]:
    """Each node's log line on where its copy of the fan-out model came from."""
    found = {}
    for index in range(1, NODES + 1):
        for line in (workdir / f"node-{index}.log").read_text().splitlines():
            if "fetched fan-out" in line:
                found[f"node-{index}"] = line.split(" from ", 1)[1].split(",")[0]
    return found


def _add(address: str, alias: str, path: Path) -> None:
    with FleetClient([address], timeout_s=600) as client:
        client.add_model(path, models_pb2.AddModelHeader(alias=alias))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="(same size: one fleet, 3 nodes)")
    parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-models-"))
    etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
    processes = []
    try:
        coordinator = start_coordinator(
            grpc_address=f"127.0.0.1:{free_port()}",
            etcd=etcd.endpoints,
            extra_args=("--model-dir", str(workdir / "coordinator-models")),
            log_path=workdir / "coordinator.log",
        )
        processes.append(coordinator)
        coordinator.wait_serving(60)
        for index in range(1, NODES + 1):
            entries = (SMOLLM, GEMMA) if index == 1 else (SMOLLM,)
            store = _store(workdir / f"store-{index}", *entries)
            node = start_node(
                listen=f"127.0.0.1:{free_port()}",
                models=SMOLLM.alias,
                slots=2,
                extra_args=(
                    "--coordinator",
                    coordinator.address,
                    "--node-id",
                    f"node-{index}",
                    "--threads",
                    "1",
                    "--keep-alive",
                    "forever",
                ),
                env={"EDGEFLEET_MODEL_DIR": str(store)},
                log_path=workdir / f"node-{index}.log",
                name=f"node-{index}",
            )
            processes.append(node)
        for node in processes[1:]:
            node.wait_serving(120)
        with FleetClient([coordinator.address], timeout_s=600) as client:
            deadline = time.monotonic() + 60
            while len(client.status().nodes) < NODES and time.monotonic() < deadline:
                time.sleep(0.2)
            # The nodes' estimates of the cached models (their first reports carry them).
            estimates: dict[str, int] = {}
            deadline = time.monotonic() + 30
            while len(estimates) < 2 and time.monotonic() < deadline:
                for n in client.status().nodes:
                    if n.node_id == "node-1":
                        for stored in n.capacity.stored_models:
                            if stored.memory_estimate_bytes:
                                estimates[stored.alias] = stored.memory_estimate_bytes
                time.sleep(0.5)

            cold_cached = _first_token_s(client, GEMMA.alias)
            _add(coordinator.address, "gemma-fetched", ModelStore().path_of(GEMMA))
            cold_fetched = _first_token_s(client, "gemma-fetched")

            memory = []
            for alias in (SMOLLM.alias, GEMMA.alias):
                measured = _nodes_with(client, alias)[
                    "node-1" if alias == GEMMA.alias else "node-2"
                ]
                estimate = estimates.get(alias, 0)
                memory.append(
                    {
                        "model": alias,
                        "estimated_mib": estimate / 2**20,
                        "measured_mib": measured.memory_bytes / 2**20,
                        "error_pct": 100
                        * (estimate - measured.memory_bytes)
                        / max(1, measured.memory_bytes),
                    }
                )

            _add(coordinator.address, "fan-out", ModelStore().path_of(SMOLLM))
            alone = asyncio.run(_fetch_copies(coordinator.address, workdir / "copies", NODES))
            started = time.perf_counter()
            with grpc.insecure_channel(coordinator.address) as channel:
                models_pb2_grpc.ModelServiceStub(channel).Deploy(
                    models_pb2.Deployment(alias="fan-out")
                )
            while len(_nodes_with(client, "fan-out")) < NODES:
                if time.perf_counter() - started > 600:
                    raise RuntimeError("fan-out did not finish in 10 minutes")
                time.sleep(0.1)
            fan_out = time.perf_counter() - started
            sources = _fetch_sources(workdir)
    finally:
        for process in reversed(processes):
            process.terminate(timeout_s=15)
        etcd.stop()

    print(
        report.table(
            ["case", "model", "size MB", "request to first token s"],
            [
                ["file cached on the node", GEMMA.alias, GEMMA.size_bytes / 1e6, cold_cached],
                [
                    "file fetched from the coordinator",
                    GEMMA.alias,
                    GEMMA.size_bytes / 1e6,
                    cold_fetched,
                ],
            ],
        )
    )
    print()
    print(
        report.table(
            ["model", "estimated MiB", "measured MiB", "error %"],
            [[m["model"], m["estimated_mib"], m["measured_mib"], m["error_pct"]] for m in memory],
        )
    )
    print()
    print(
        report.table(
            ["fan-out", "nodes", "size MB", "seconds"],
            [
                ["coordinator alone: 3 copies at once", NODES, SMOLLM.size_bytes / 1e6, alone],
                [
                    "deploy --replicas all: seed + peers, loaded",
                    NODES,
                    SMOLLM.size_bytes / 1e6,
                    fan_out,
                ],
            ],
        )
    )
    result = {
        "cold_load_s": {"cached": cold_cached, "fetched": cold_fetched, "model": GEMMA.alias},
        "memory_estimates": memory,
        "fan_out_s": {
            "coordinator_alone": alone,
            "deploy_with_peers": fan_out,
            "nodes": NODES,
            "fetched_from": sources,
        },
    }
    print(f"where each node's copy came from: {sources}")
    path = report.write("models", result)
    print(f"\nresults: {path}")
    return result
