"""The fleet's model registry: an operator adds a GGUF file through a
coordinator; a node that never had it fetches it from the coordinator (sha256
checked) when a request needs it; a cut transfer resumes; a bad upload leaves
nothing behind and changes nothing.

Real processes: etcd, a coordinator, nodes with their own model stores, the
CLI; the model is SmolLM2-135M's file added under another alias.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from coordinator.model_loads import file_memory_needed as memory_needed
from coordinator.model_registry import VariantFacts, choose_variant, variant_facts
from edgefleet.catalog import CATALOG
from edgefleet.errors import EdgefleetError, Reason, reason_of
from edgefleet.model_fetch import ModelFetcher
from edgefleet.model_store import CachedFile, plan_cache, sha256_of
from edgefleet.v1 import common_pb2, models_pb2, models_pb2_grpc, node_pb2, node_pb2_grpc
from tests.helpers import wait_until
from tests.test_cli import run_cli

READY = common_pb2.NODE_STATE_READY
SMOLLM = CATALOG["smollm2-135m"]
MiB = 1 << 20


def own_store(tmp_path, default_model_path, name: str):
    """A node's model store holding only the default model (a link to the cached file)."""
    root = tmp_path / name
    (root / "smollm2-135m").mkdir(parents=True)
    (root / "smollm2-135m" / SMOLLM.file_name).symlink_to(default_model_path)
    return root


def add_with_cli(coordinator, alias: str, path, *extra: str):
    return run_cli(
        "models",
        "add",
        alias,
        str(path),
        *extra,
        "--coordinator",
        coordinator.address,
        "--profile",
        "none",
    )


def registry(address: str) -> dict[str, models_pb2.RegisteredModel]:
    with grpc.insecure_channel(address) as channel:
        reply = models_pb2_grpc.ModelServiceStub(channel).ListRegistry(
            models_pb2.ListRegistryRequest()
        )
    return {model.alias: model for model in reply.models}


# --- pure rules ---------------------------------------------------------------------------
Q4 = common_pb2.ModelFile(variant="q4_k_m", size_bytes=400 * MiB)
Q8 = common_pb2.ModelFile(variant="q8_0", size_bytes=800 * MiB)


def test_each_node_gets_the_largest_variant_that_fits_its_memory():
    def host(memory: int) -> VariantFacts:
        return VariantFacts(memory_available=memory)

    assert choose_variant([Q4, Q8], host(memory_needed(Q8.size_bytes))).variant == "q8_0"
    assert choose_variant([Q4, Q8], host(memory_needed(Q8.size_bytes) - 1)).variant == "q4_k_m"
    # Nothing fits: the smallest (the node may unload idle models, or refuse).
    assert choose_variant([Q8, Q4], host(10 * MiB)).variant == "q4_k_m"
    assert choose_variant([], host(10 * MiB)) is None


ROOM_FOR_Q8 = memory_needed(Q8.size_bytes)
ROOM_FOR_Q4 = memory_needed(Q4.size_bytes)


@pytest.mark.parametrize(
    ("why", "node", "variant"),
    [
        (
            # Such a node reports its budget left on the GPU, not host memory.
            "all layers on a GPU with room for q8, within the node's budget",
            VariantFacts(ROOM_FOR_Q8, gpu_layers=-1, gpu_memory_free=ROOM_FOR_Q8),
            "q8_0",
        ),
        (
            "all layers on a GPU with room for q8, the node's budget only for q4",
            VariantFacts(ROOM_FOR_Q8 - 1, gpu_layers=-1, gpu_memory_free=64 << 30),
            "q4_k_m",
        ),
        (
            "all layers on a GPU too small for q8: q4, however much host memory",
            VariantFacts(64 << 30, gpu_layers=-1, gpu_memory_free=ROOM_FOR_Q8 - 1),
            "q4_k_m",
        ),
        (
            "all layers on a GPU too small for either: the smallest",
            VariantFacts(64 << 30, gpu_layers=-1, gpu_memory_free=0),
            "q4_k_m",
        ),
        ("no GPU, host room for q8", VariantFacts(ROOM_FOR_Q8), "q8_0"),
        ("no GPU, host room for q4", VariantFacts(ROOM_FOR_Q8 - 1), "q4_k_m"),
        (
            "--gpu-layers -1 but no GPU read (NVML absent): host memory",
            VariantFacts(ROOM_FOR_Q8 - 1, gpu_layers=-1),
            "q4_k_m",
        ),
        (
            "some layers on a GPU with room for q8: host memory",
            VariantFacts(ROOM_FOR_Q8 - 1, gpu_layers=12, gpu_memory_free=64 << 30),
            "q4_k_m",
        ),
        (
            "a GPU the node does not use: host memory",
            VariantFacts(ROOM_FOR_Q8, gpu_layers=0, gpu_memory_free=0),
            "q8_0",
        ),
    ],
)
def test_a_gpu_node_that_offloads_every_layer_gets_the_variant_its_gpu_holds(why, node, variant):
    assert choose_variant([Q4, Q8], node).variant == variant, why


def test_a_nodes_variant_facts_come_from_its_capacity_report():
    def gpu(total: int, used: int) -> common_pb2.GpuInfo:
        return common_pb2.GpuInfo(memory_total_bytes=total, memory_used_bytes=used)

    two = common_pb2.Capacity(
        model_memory_available_bytes=5 * MiB,
        gpu_layers=-1,
        gpus=[gpu(8192 * MiB, 7000 * MiB), gpu(4096 * MiB, 1024 * MiB)],
    )
    assert variant_facts(two) == VariantFacts(5 * MiB, gpu_layers=-1, gpu_memory_free=3072 * MiB)
    assert variant_facts(two).all_on_gpu
    cpu = common_pb2.Capacity(model_memory_available_bytes=5 * MiB)
    assert variant_facts(cpu) == VariantFacts(5 * MiB)
    assert not variant_facts(cpu).all_on_gpu
    assert variant_facts(None) == VariantFacts(0)


def fake_nvml(total: int, used: int):
    """A module shaped like pynvml (the calls GpuProbe makes) with one GPU."""
    from types import SimpleNamespace

    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(
            total=total, used=used, free=total - used
        ),
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=7, memory=3),
        nvmlDeviceGetName=lambda handle: b"NVIDIA Test GPU",
    )


def test_a_gpu_nodes_capacity_report_carries_its_gpu_and_offload(monkeypatch):
    import dataclasses
    import sys

    from edgefleet.model_store import ModelStore
    from node_agent.capacity import GpuProbe, HostProbe, ThroughputMeter
    from node_agent.models import ModelManager
    from node_agent.node import Node
    from node_agent.runtime.simulated import SimulatedRuntime

    class Offloading(SimulatedRuntime):  # as llama.cpp started with --gpu-layers -1
        capabilities = dataclasses.replace(SimulatedRuntime.capabilities, gpu=True, gpu_layers=-1)

    def report(runtime) -> common_pb2.Capacity:
        models = ModelManager(
            runtime, ModelStore(), default_slots=1, queue_limit=1, default_context=512
        )
        gpus = GpuProbe()
        try:
            node = Node(
                node_id="n1",
                models=models,
                host=HostProbe(),
                gpus=gpus,
                throughput=ThroughputMeter(),
            )
            return node.capacity()
        finally:
            gpus.close()

    used = 4096 * MiB - ROOM_FOR_Q4  # a GPU with room for q4 only
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(total=4096 * MiB, used=used))
    capacity = report(Offloading())
    assert capacity.gpu_layers == -1
    [gpu] = capacity.gpus
    assert (gpu.name, gpu.memory_total_bytes, gpu.memory_used_bytes) == (
        "NVIDIA Test GPU",
        4096 * MiB,
        used,
    )
    assert variant_facts(capacity).gpu_memory_free == ROOM_FOR_Q4
    # The GPU decides, whatever this machine's host memory.
    assert choose_variant([Q4, Q8], variant_facts(capacity)).variant == "q4_k_m"
    # A CPU node: no offload, whatever GPU it has.
    assert report(SimulatedRuntime()).gpu_layers == 0


def test_a_node_that_offloads_every_layer_budgets_its_gpu_memory():
    from node_agent.capacity import GpuReading, model_memory_total

    small = GpuReading(0, "T4", 16 << 30, 0, 0.0)
    big = GpuReading(1, "H200", 141 << 30, 0, 0.0)
    host = 32 << 30
    assert model_memory_total(-1, host, [small, big]) == (141 << 30, "GPU 1 (H200)")
    assert model_memory_total(-1, host, []) == (host, "host memory")  # no GPU read
    assert model_memory_total(20, host, [big]) == (host, "host memory")  # partial offload
    assert model_memory_total(0, host, [big]) == (host, "host memory")


def test_the_model_cache_drops_superseded_then_least_recently_used_files_never_ones_in_use():
    """Only under --model-cache-size, and only as much as the new file needs."""

    def cached(name, alias, mib, used_at):
        return CachedFile(Path(name), alias, mib * MiB, used_at)

    old_chat = cached("chat-v1", "chat", 100, 50.0)  # the same alias: superseded
    kiosk = cached("kiosk", "kiosk", 100, 10.0)  # used longest ago
    loaded = cached("loaded", "smollm2-135m", 100, 1.0)  # oldest, but in use
    recent = cached("recent", "helper", 100, 90.0)
    files = [old_chat, kiosk, loaded, recent]

    def plan(limit_mib, alias="chat", size_mib=100):
        limit = None if limit_mib is None else limit_mib * MiB
        drop, over = plan_cache(
            files,
            in_use={Path("loaded")},
            alias=alias,
            size_bytes=size_mib * MiB,
            limit_bytes=limit,
        )
        return [f.path.name for f in drop], over // MiB

    assert plan(None) == ([], 0)  # no limit: nothing is deleted
    assert plan(500) == ([], 0)  # 400 kept + 100 coming fit
    assert plan(400) == (["chat-v1"], 0)  # the same model's other file first
    assert plan(300) == (["chat-v1", "kiosk"], 0)
    assert plan(200) == (["chat-v1", "kiosk", "recent"], 0)
    assert plan(150) == (["chat-v1", "kiosk", "recent"], 50)  # the loaded one stays: over
    assert plan(300, alias="other") == (["kiosk", "chat-v1"], 0)  # by last use


def test_a_nodes_report_of_fetches_and_origins_is_bounded():
    from coordinator.node_limits import MAX_MODELS, MAX_ORIGINS, MAX_TEXT_CHARS, trim_capacity

    capacity = common_pb2.Capacity()
    for i in range(MAX_MODELS + 10):
        capacity.fetches.add(alias="x" * 1000, bytes_done=i, bytes_total=10)
    capacity.active_by_origin.update({f"c{i}": 1 for i in range(MAX_ORIGINS + 10)})
    capacity.active_by_origin["y" * 1000] = 1
    trim_capacity(capacity)
    assert len(capacity.fetches) == MAX_MODELS
    assert all(len(f.alias) == MAX_TEXT_CHARS for f in capacity.fetches)
    assert len(capacity.active_by_origin) == MAX_ORIGINS
    assert all(len(o) <= MAX_TEXT_CHARS for o in capacity.active_by_origin)


def test_a_fetch_counts_the_room_other_fetches_still_need(tmp_path):
    """Two fetches that each fit the disk alone but not together: the second
    is refused before it writes a byte, not half-way when the disk fills."""
    fetcher = ModelFetcher(lambda: [], lambda address: None)
    free = shutil.disk_usage(tmp_path).free
    source = common_pb2.ModelFile(sha256="0" * 64, size_bytes=free // 2)
    fetcher.progress["other"] = (0, free // 2)  # a fetch running, nothing written yet
    with pytest.raises(EdgefleetError) as refused:
        asyncio.run(fetcher.fetch("big", source, tmp_path / "fleet" / "big" / "x.gguf"))
    assert refused.value.reason is Reason.DISK_FULL
    assert "promised to other fetches" in refused.value.message
    assert not list((tmp_path / "fleet").rglob("*.partial"))


def test_an_air_gapped_device_is_seeded_from_a_folder(tmp_path, default_model_path):
    folder = tmp_path / "usb-stick"
    folder.mkdir()
    (folder / "any-name.gguf").symlink_to(default_model_path)  # the catalog's file
    (folder / "kiosk-chat.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    env = {"EDGEFLEET_MODEL_DIR": str(tmp_path / "store")}
    result = run_cli("models", "import", str(folder), env=env)
    assert result.returncode == 0, result.stderr
    assert "2 model file(s) imported" in result.stdout
    assert sha256_of(tmp_path / "store" / "smollm2-135m" / SMOLLM.file_name) == SMOLLM.sha256
    sha = sha256_of(folder / "kiosk-chat.gguf")
    assert (tmp_path / "store" / "fleet" / "kiosk-chat" / f"{sha}.gguf").is_file()
    again = run_cli("models", "import", str(folder), env=env)  # nothing new
    assert again.returncode == 0 and "0 model file(s) imported" in again.stdout
    (folder / "notes.gguf").write_text("not a model")
    bad = run_cli("models", "import", str(folder), env=env)
    assert bad.returncode == 1 and "(NOT_GGUF)" in bad.stderr


# --- end to end ---------------------------------------------------------------------------
def test_a_model_added_from_a_file_reaches_a_node_that_never_had_it(
    fleet_factory, tmp_path, default_model_path
):
    model_dir = tmp_path / "coordinator-models"
    coordinator = fleet_factory.coordinator("--model-dir", str(model_dir))
    store = own_store(tmp_path, default_model_path, "node-store")
    fleet_factory.node("n1", env={"EDGEFLEET_MODEL_DIR": str(store)})
    fleet_factory.wait_ready_nodes(1)

    added = add_with_cli(coordinator, "tiny-chat", default_model_path, "--task", "chat,routing")
    assert added.returncode == 0, added.stderr
    assert "tiny-chat: variant q4_1 (llama, 135M parameters, Q4_1" in added.stdout
    record = registry(coordinator.address)["tiny-chat"]
    [variant] = record.variants
    assert (variant.sha256, variant.size_bytes) == (SMOLLM.sha256, SMOLLM.size_bytes)
    assert list(record.tasks) == ["chat", "routing"] and not record.builtin
    assert (model_dir / f"{SMOLLM.sha256}.gguf").is_file()
    assert not list(model_dir.glob("*.partial"))

    # The node has never seen "tiny-chat": a request loads it there, the file
    # fetched from the coordinator and checked.
    with fleet_factory.client() as client:
        text = "".join(
            c.text
            for c in client.complete(
                "tiny-chat", [("user", "Say hello.")], max_tokens=8, temperature=0
            )
        )
        assert text
        loaded = {m.alias for n in client.status().nodes for m in n.capacity.models}
    assert "tiny-chat" in loaded
    fetched = store / "fleet" / "tiny-chat" / f"{SMOLLM.sha256}.gguf"
    assert fetched.is_file() and not fetched.is_symlink()
    assert sha256_of(fetched) == SMOLLM.sha256
    assert not list(fetched.parent.glob("*.partial"))

    # The listing shows it; removing it takes it out of the registry and off the disk.
    listed = run_cli(
        "models", "registry", "--coordinator", coordinator.address, "--profile", "none"
    )
    assert listed.returncode == 0 and "tiny-chat" in listed.stdout and "added" in listed.stdout
    removed = run_cli(
        "models", "remove", "tiny-chat", "--coordinator", coordinator.address, "--profile", "none"
    )
    assert removed.returncode == 0, removed.stderr
    assert "tiny-chat" not in registry(coordinator.address)
    assert not (model_dir / f"{SMOLLM.sha256}.gguf").exists()


def test_bad_uploads_leave_nothing_behind_and_change_nothing(
    fleet_factory, tmp_path, default_model_path
):
    model_dir = tmp_path / "coordinator-models"
    coordinator = fleet_factory.coordinator("--model-dir", str(model_dir))
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"just some text, not a model\n" * 1000)

    cases = [
        (("bad", not_gguf), "NOT_GGUF"),
        (("wrong-sum", default_model_path, "--sha256", "0" * 64), "MODEL_FILE_BAD"),
        (("smollm2-135m", default_model_path), "INVALID_REQUEST"),  # a catalog alias
        (("Bad Name", default_model_path), "INVALID_REQUEST"),
    ]
    for (alias, path, *extra), reason in cases:
        result = add_with_cli(coordinator, alias, path, *extra)
        assert result.returncode == 1 and f"({reason})" in result.stderr, (alias, result.stderr)
    assert set(registry(coordinator.address)) == set(CATALOG)
    assert not [p for p in model_dir.glob("*") if p.is_file()]

    # An upload whose bytes stop short of the size its header gave.
    def short_upload():
        header = models_pb2.AddModelHeader(alias="short", size_bytes=10 * MiB)
        yield models_pb2.AddModelRequest(header=header)
        yield models_pb2.AddModelRequest(chunk=default_model_path.read_bytes()[:MiB])

    with grpc.insecure_channel(coordinator.address) as channel:
        with pytest.raises(grpc.RpcError) as cut:
            models_pb2_grpc.ModelServiceStub(channel).AddModel(short_upload())
    assert reason_of(cut.value) is Reason.UPLOAD_INCOMPLETE
    assert cut.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "short" not in registry(coordinator.address)
    assert not [p for p in model_dir.glob("*") if p.is_file()]


def test_a_file_added_through_one_replica_reaches_the_others_and_so_does_its_removal(
    fleet_factory, tmp_path, default_model_path
):
    """Two replicas with their own model folders: a model added through the
    first is copied to the second (sha256 checked), so a node that knows only
    the second gets it; a removal through the first deletes the second's copy,
    and a file no record names is deleted there too."""
    dirs = [tmp_path / "replica-a-models", tmp_path / "replica-b-models"]
    first = fleet_factory.coordinator("--model-dir", str(dirs[0]))
    second = fleet_factory.coordinator("--model-dir", str(dirs[1]))
    dirs[1].mkdir()
    stray = dirs[1] / f"{'0' * 64}.gguf"
    stray.write_bytes(b"GGUF left by an old model")
    own = dirs[1] / "mistral-7b.gguf"  # an operator's file, not named by a sha256
    own.write_bytes(b"GGUF the operator's own")
    assert add_with_cli(first, "tiny-chat", default_model_path).returncode == 0
    copy = dirs[1] / f"{SMOLLM.sha256}.gguf"
    wait_until(copy.is_file, timeout_s=60, what="the second replica to copy the file")
    assert sha256_of(copy) == SMOLLM.sha256
    assert not stray.exists() and own.exists()
    assert "copied tiny-chat" in (tmp_path / "coordinator-1.log").read_text()

    store = own_store(tmp_path, default_model_path, "node-store")
    fleet_factory.node("n1", coordinators=[second], env={"EDGEFLEET_MODEL_DIR": str(store)})
    fleet_factory.wait_ready_nodes(1, second)
    with fleet_factory.client(second) as client:
        assert "".join(c.text for c in client.complete("tiny-chat", [("user", "Hi")], max_tokens=4))
    assert (
        f"fetched tiny-chat (93 MiB) from coordinator {second.address}"
        in (tmp_path / "node-0.log").read_text()
    )

    removed = run_cli(
        "models", "remove", "tiny-chat", "--coordinator", first.address, "--profile", "none"
    )
    assert removed.returncode == 0, removed.stderr
    assert not (dirs[0] / f"{SMOLLM.sha256}.gguf").exists()
    wait_until(lambda: not copy.exists(), timeout_s=30, what="the second replica's copy to go")


def test_a_cut_fetch_resumes_and_a_wrong_file_is_never_kept(
    fleet_factory, tmp_path, default_model_path
):
    """The node's fetcher against a real coordinator: a partial file left by
    a cut transfer is continued, not restarted; a partial file that is not a
    prefix of the model fails the sha256 check and is deleted."""
    coordinator = fleet_factory.coordinator("--model-dir", str(tmp_path / "coordinator-models"))
    added = add_with_cli(coordinator, "tiny-chat", default_model_path)
    assert added.returncode == 0, added.stderr
    source = registry(coordinator.address)["tiny-chat"].variants[0]
    target = tmp_path / "node" / "fleet" / "tiny-chat" / f"{source.sha256}.gguf"
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True)
    head = 40 * MiB
    with default_model_path.open("rb") as f:
        partial.write_bytes(f.read(head))

    received: list[int] = []

    async def fetch():
        fetcher = ModelFetcher(
            lambda: [coordinator.address], lambda address: grpc.aio.insecure_channel(address)
        )
        task = asyncio.create_task(fetcher.fetch("tiny-chat", source, target))
        while not task.done():
            received.extend(done for done, _ in fetcher.progress.values())
            await asyncio.sleep(0.001)
        await task

    asyncio.run(fetch())
    assert sha256_of(target) == source.sha256 and not partial.exists()
    assert received and min(received) >= head  # it went on from the cut, not from 0

    # A partial file that is not the model's start: the result fails its check.
    target.unlink()
    partial.write_bytes(os.urandom(MiB))
    fetcher = ModelFetcher(
        lambda: [coordinator.address], lambda address: grpc.aio.insecure_channel(address)
    )
    with pytest.raises(Exception) as bad:
        asyncio.run(fetcher.fetch("tiny-chat", source, target))
    assert getattr(bad.value, "reason", None) is Reason.MODEL_FILE_BAD
    assert not target.exists() and not partial.exists()
    # The next fetch starts over and succeeds.
    asyncio.run(fetcher.fetch("tiny-chat", source, target))
    assert hashlib.sha256(target.read_bytes()).hexdigest() == source.sha256


def test_a_node_keeps_its_model_files_within_its_cache_size(
    fleet_factory, tmp_path, default_model_path
):
    """--model-cache-size 250MiB, the start model (94 MiB, loaded) and an old
    100 MiB file of another model: fetching a 94 MiB model deletes the old
    file first; a third model that only fits by deleting loaded ones is
    refused with DISK_FULL, nothing written."""
    coordinator = fleet_factory.coordinator("--model-dir", str(tmp_path / "coordinator-models"))
    for alias in ("tiny-chat", "tiny-chat-2"):
        assert add_with_cli(coordinator, alias, default_model_path).returncode == 0
    store = own_store(tmp_path, default_model_path, "node-store")
    old = store / "fleet" / "old-chat" / f"{'1' * 64}.gguf"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"GGUF" + bytes(100 * MiB - 4))
    os.utime(old, (time.time() - 86400, time.time() - 86400))  # used yesterday
    fleet_factory.node(
        "n1",
        env={"EDGEFLEET_MODEL_DIR": str(store)},
        extra_args=("--model-cache-size", "250MiB"),
    )
    fleet_factory.wait_ready_nodes(1)
    with fleet_factory.client() as client:
        assert "".join(c.text for c in client.complete("tiny-chat", [("user", "Hi")], max_tokens=4))
        assert not old.exists()
        assert (store / "fleet" / "tiny-chat" / f"{SMOLLM.sha256}.gguf").is_file()
        log = (tmp_path / "node-0.log").read_text()
        assert "deleting cached old-chat" in log and "least recently used" in log

        with pytest.raises(EdgefleetError) as refused:
            "".join(c.text for c in client.complete("tiny-chat-2", [("user", "Hi")]))
        assert refused.value.reason is Reason.MODEL_LOAD_FAILED
        assert "n1: DISK_FULL" in refused.value.message
        assert "--model-cache-size 250 MiB" in refused.value.message
        assert not (store / "fleet" / "tiny-chat-2").exists()
        # What it had still serves.
        assert "".join(c.text for c in client.complete("tiny-chat", [("user", "Hi")], max_tokens=4))


def small_disk(directory, size_mib: int) -> tuple[str, ...]:
    """A command prefix that runs a daemon with ``directory`` on its own
    ``size_mib`` filesystem (a tmpfs in a private mount namespace)."""
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    return (
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={size_mib}m tmpfs "$0" && exec "$@"',
        str(directory),
    )


def test_a_disk_that_fills_mid_fetch_leaves_no_partial_file_and_the_node_serves_on(
    fleet_factory, tmp_path, default_model_path
):
    """The node's fleet-model folder is a real 240 MiB filesystem: the fetch
    of a 98 MiB model passes the free-space check (size + 128 MiB margin), then
    something else fills the disk while it runs. The request gets a clear
    error naming the node and DISK_FULL, the partial file is gone, the node
    goes on serving the model it had, and once room is back the same fetch
    starts over and completes."""
    coordinator = fleet_factory.coordinator("--model-dir", str(tmp_path / "coordinator-models"))
    assert add_with_cli(coordinator, "tiny-chat", default_model_path).returncode == 0
    source = registry(coordinator.address)["tiny-chat"].variants[0]
    store = own_store(tmp_path, default_model_path, "node-store")
    (store / "fleet").mkdir()
    node = fleet_factory.node(
        "n1", env={"EDGEFLEET_MODEL_DIR": str(store)}, wrap=small_disk(store / "fleet", 240)
    )
    fleet_factory.wait_ready_nodes(1)
    # The node's own view of its folder: the tmpfs lives in its mount namespace.
    fleet_dir = Path(f"/proc/{node.process.pid}/root") / store.relative_to("/") / "fleet"
    partial = fleet_dir / "tiny-chat" / f"{source.sha256}.gguf.partial"
    filled = threading.Event()

    def fill_when_the_fetch_starts():
        wait_until(
            lambda: partial.exists() and partial.stat().st_size > 0,
            timeout_s=60,
            interval_s=0.002,
            what="the fetch to start",
        )
        block = bytes(4 * MiB)
        with (fleet_dir / "filler").open("wb", buffering=0) as f:
            try:
                while True:  # tens of milliseconds; the fetch takes far longer
                    f.write(block)
            except OSError as error:
                assert error.errno == errno.ENOSPC
        filled.set()

    filler = threading.Thread(target=fill_when_the_fetch_starts, daemon=True)
    filler.start()
    with fleet_factory.client() as client:
        with pytest.raises(EdgefleetError) as failed:
            "".join(c.text for c in client.complete("tiny-chat", [("user", "Hi")], max_tokens=4))
        filler.join(timeout=10)
        assert filled.is_set()
        assert failed.value.reason is Reason.MODEL_LOAD_FAILED
        assert "n1: DISK_FULL" in failed.value.message
        assert not partial.exists()
        assert not (fleet_dir / "tiny-chat" / f"{source.sha256}.gguf").exists()
        assert "the partial file was deleted" in node.log_path.read_text()
        # The node is not blamed and serves what it had.
        [status] = client.status().nodes
        assert status.state == READY
        assert "".join(
            c.text for c in client.complete("smollm2-135m", [("user", "Hi")], max_tokens=4)
        )

    # Room again: the node fetches the file from the start and loads it.
    (fleet_dir / "filler").unlink()
    with grpc.insecure_channel(node.address) as channel:
        node_pb2_grpc.NodeServiceStub(channel).LoadModel(
            node_pb2.LoadModelRequest(model="tiny-chat", source=source), timeout=120
        )
    assert sha256_of(fleet_dir / "tiny-chat" / f"{source.sha256}.gguf") == source.sha256


def test_a_catalog_model_a_node_lacks_comes_from_the_coordinator(
    fleet_factory, tmp_path, default_model_path
):
    """No package index needed on the device: the coordinator's copy of
    gemma3-270m (its machine's model store) is sent to the node that loads it."""
    gemma = CATALOG["gemma3-270m"]
    fleet_factory.coordinator()
    store = own_store(tmp_path, default_model_path, "node-store")
    fleet_factory.node("n1", env={"EDGEFLEET_MODEL_DIR": str(store)})
    fleet_factory.wait_ready_nodes(1)
    with fleet_factory.client() as client:
        text = "".join(
            c.text
            for c in client.complete(gemma.alias, [("user", "Hi")], max_tokens=4, temperature=0)
        )
    assert text
    copy = store / gemma.alias / gemma.file_name
    assert copy.is_file() and sha256_of(copy) == gemma.sha256
    log = (tmp_path / "node-0.log").read_text()
    assert f"fetched {gemma.alias}" in log and "sha256 verified" in log


# --- desired state --------------------------------------------------------------------------
def facts(node_id, **kwargs):
    from coordinator.deployments import NodeFacts

    return NodeFacts(node_id, **kwargs)


GiB = 1 << 30


@pytest.mark.parametrize(
    ("replicas", "selector", "nodes", "load", "unload", "wanted"),
    [
        # All matching nodes: the ones without it load it.
        (0, {}, [facts("a", loaded=True), facts("b"), facts("c")], ("b", "c"), (), 3),
        # Two replicas: a cached file first, then the most memory.
        (
            2,
            {},
            [facts("a", memory_available=8 * GiB), facts("b", cached=True), facts("c")],
            ("b", "a"),
            (),
            2,
        ),
        # A load under way counts: nothing more to start.
        (1, {}, [facts("a", loading=True), facts("b")], (), (), 1),
        # Too many: the least busy gives it back.
        (1, {}, [facts("a", loaded=True, busy=2), facts("b", loaded=True)], (), ("b",), 1),
        # The selector narrows the nodes; more replicas than nodes: all that match.
        (
            5,
            {"site": "shop"},
            [facts("a", labels={"site": "shop"}), facts("b", labels={"site": "clinic"})],
            ("a",),
            (),
            1,
        ),
        # A node that refused it lately is not asked again yet.
        (0, {}, [facts("a", refused=True), facts("b")], ("b",), (), 2),
        # No node has the file: one seeds it, the others follow from that node.
        (0, {}, [facts("a"), facts("b"), facts("c")], ("a",), (), 3),
        (0, {}, [facts("a", loading=True), facts("b"), facts("c")], (), (), 3),
    ],
)
def test_the_reconciler_plans_loads_and_unloads(replicas, selector, nodes, load, unload, wanted):
    from coordinator.deployments import plan

    deployment = models_pb2.Deployment(alias="m", replicas=replicas, selector=selector)
    decided = plan(deployment, nodes)
    assert (decided.load, decided.unload, decided.wanted) == (load, unload, wanted)


def test_a_selector_that_matches_nothing_is_a_problem_not_a_crash():
    from coordinator.deployments import plan

    decided = plan(
        models_pb2.Deployment(alias="m", selector={"site": "moon"}), [facts("a"), facts("b")]
    )
    assert (decided.wanted, decided.load, decided.problem) == (
        0,
        (),
        "the selector matches no ready node",
    )


def test_deploy_loads_a_model_everywhere_and_undeploy_unloads_it(
    fleet_factory, tmp_path, default_model_path
):
    coordinator = fleet_factory.coordinator("--model-dir", str(tmp_path / "coordinator-models"))
    for name in ("n1", "n2"):
        store = own_store(tmp_path, default_model_path, f"{name}-store")
        fleet_factory.node(
            name,
            env={"EDGEFLEET_MODEL_DIR": str(store)},
            # Models loaded on demand go after 2 idle seconds; deployed ones stay.
            extra_args=("--keep-alive", "2s", "--idle-check", "0.5s"),
        )
    fleet_factory.wait_ready_nodes(2)
    assert add_with_cli(coordinator, "tiny-chat", default_model_path).returncode == 0
    cli = ("--coordinator", coordinator.address, "--profile", "none")

    nowhere = run_cli("models", "deploy", "tiny-chat", "--selector", "site=moon", *cli)
    assert nowhere.returncode == 1 and "(NO_MATCHING_NODE)" in nowhere.stderr
    unknown = run_cli("models", "deploy", "no-such-model", *cli)
    assert unknown.returncode == 1 and "(UNKNOWN_MODEL)" in unknown.stderr

    deployed = run_cli("models", "deploy", "tiny-chat", "--replicas", "all", *cli)
    assert deployed.returncode == 0, deployed.stderr
    with fleet_factory.client() as client:

        def holding():
            return sorted(
                n.node_id
                for n in client.status().nodes
                if any(m.alias == "tiny-chat" for m in n.capacity.models)
            )

        wait_until(lambda: holding() == ["n1", "n2"], timeout_s=90, what="both nodes loaded")
        # One node fetched the file from the coordinator; the other from that node.
        logs = [(tmp_path / f"node-{i}.log").read_text() for i in (0, 1)]
        fetched = sorted(
            line.split(" from ", 1)[1].split(",")[0]
            for log in logs
            for line in log.splitlines()
            if "fetched tiny-chat" in line
        )
        assert len(fetched) == 2 and fetched[0].startswith("coordinator"), fetched
        assert fetched[1] in ("node n1", "node n2"), fetched
        time.sleep(4)  # twice the keep-alive of on-demand loads
        assert holding() == ["n1", "n2"]
        busy = run_cli("models", "remove", "tiny-chat", *cli)
        assert busy.returncode == 1 and "(MODEL_DEPLOYED)" in busy.stderr
        ps = run_cli("models", "ps", *cli)
        assert ps.returncode == 0, ps.stderr
        [row] = [line for line in ps.stdout.splitlines() if line.startswith("tiny-chat")]
        assert "2/2" in row and "n1, n2" in row
        undeployed = run_cli("models", "undeploy", "tiny-chat", *cli)
        assert undeployed.returncode == 0, undeployed.stderr
        wait_until(lambda: holding() == [], timeout_s=60, what="both nodes to unload it")
        # Requests still work: it loads on demand again.
        assert "".join(c.text for c in client.complete("tiny-chat", [("user", "Hi")], max_tokens=4))


def test_a_transfer_cut_again_and_again_still_completes(tmp_path, default_model_path):
    """A source that drops the stream every few MiB: the node resumes each time
    from where its file ends (never repeating or skipping a byte)."""
    from concurrent import futures

    size = default_model_path.stat().st_size
    sha = sha256_of(default_model_path)
    asked: list[int] = []

    class Flaky(models_pb2_grpc.ModelServiceServicer):
        def FetchModel(self, request, context):
            asked.append(request.offset)
            with default_model_path.open("rb") as f:
                f.seek(request.offset)
                for _ in range(7):  # 7 MiB, then the line drops
                    data = f.read(MiB)
                    if not data:
                        return
                    yield models_pb2.FetchModelChunk(data=data, size_bytes=size)
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

    server = grpc.server(futures.ThreadPoolExecutor(4))
    models_pb2_grpc.add_ModelServiceServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        source = common_pb2.ModelFile(sha256=sha, size_bytes=size)
        target = tmp_path / "fleet" / "tiny" / f"{sha}.gguf"
        fetcher = ModelFetcher(
            lambda: [f"127.0.0.1:{port}"], lambda address: grpc.aio.insecure_channel(address)
        )
        asyncio.run(fetcher.fetch("tiny", source, target))
    finally:
        server.stop(0)
    assert sha256_of(target) == sha
    assert asked == list(range(0, size, 7 * MiB))  # each resume where the file ended
