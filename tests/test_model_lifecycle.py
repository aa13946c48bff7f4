"""Models on a node: memory estimates, budgets, LRU eviction, keep-alive.

Pure tests of the estimate (GGUF header) and of the eviction decision, a
ModelManager over the simulated runtime (shared loads, idle unloads), and real
nodes on the real models (smollm2-135m, gemma3-270m) for the budget, the busy
model that is never evicted, and the keep-alive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import threading
from pathlib import Path

import grpc
import pytest

from edgefleet.catalog import CATALOG
from edgefleet.errors import InvalidArgument, Reason, reason_of
from edgefleet.model_memory import (
    PROMPT_CHUNK_TOKENS,
    GgufHeader,
    Resident,
    estimate,
    parse_budget,
    parse_duration,
    plan_load,
    read_header,
)
from edgefleet.model_store import ModelStore
from edgefleet.v1 import node_pb2
from node_agent.models import ModelManager
from node_agent.runtime.simulated import SimulatedRuntime
from tests.helpers import chat_request, node_stub, rpc_error, wait_until

MiB = 1 << 20
SMOLLM, GEMMA = "smollm2-135m", "gemma3-270m"


def _cached(alias: str) -> Path:
    store = ModelStore()
    if not store.is_cached(CATALOG[alias]):
        pytest.skip(f"{alias} is not in the model store (make install)")
    return store.path_of(CATALOG[alias])


# --- the estimate ---------------------------------------------------------------------------


def test_the_header_gives_the_fields_that_decide_memory():
    smollm = read_header(_cached(SMOLLM))
    assert (smollm.architecture, smollm.n_layer, smollm.n_head_kv) == ("llama", 30, 3)
    assert (smollm.head_dim_k, smollm.head_dim_v, smollm.n_vocab) == (64, 64, 49152)
    gemma = read_header(_cached(GEMMA))
    assert (gemma.architecture, gemma.n_layer, gemma.n_head_kv) == ("gemma3", 18, 1)
    assert (gemma.head_dim_k, gemma.n_vocab, gemma.trained_context) == (256, 262144, 32768)
    for header, alias in ((smollm, SMOLLM), (gemma, GEMMA)):
        # The tensors are the file less its header (a few MiB of metadata).
        size = CATALOG[alias].size_bytes
        assert size - 8 * MiB < header.weights_bytes < size


def test_the_kv_cache_is_layers_by_context_by_kv_heads_in_f16():
    header = GgufHeader(
        architecture="llama",
        n_layer=30,
        n_embd=576,
        n_head=9,
        n_head_kv=3,
        head_dim_k=64,
        head_dim_v=64,
        n_vocab=49152,
        trained_context=8192,
        weights_bytes=96_576_768,
    )
    # 4 slots + 1 continuation slot of 2048 tokens: llama.cpp logs 225 MiB for this.
    found = estimate(header, context_per_slot=2048, sequences=5, batch_tokens=261)
    assert found.kv_cache_bytes == 30 * 2048 * 5 * 3 * (64 + 64) * 2 == 225 * MiB
    assert found.weights_bytes == 96_576_768
    # Logits of one micro-batch and the output buffer, plus a little (llama.cpp: 52+1 MiB).
    assert 50 * MiB < found.compute_bytes < 60 * MiB
    assert found.total_bytes == found.weights_bytes + found.kv_cache_bytes + found.compute_bytes
    double = estimate(header, context_per_slot=4096, sequences=5, batch_tokens=261)
    assert double.kv_cache_bytes == 2 * found.kv_cache_bytes


def test_the_manager_estimates_cached_catalog_models_for_the_capacity_report():
    _cached(SMOLLM), _cached(GEMMA)

    class Weighted(SimulatedRuntime):  # the llama.cpp runtime's capabilities: weights
        capabilities = dataclasses.replace(SimulatedRuntime.capabilities, needs_weights=True)

    models = ModelManager(
        Weighted(), ModelStore(), default_slots=4, queue_limit=1, default_context=2048
    )
    smollm = models.memory_estimate_bytes(SMOLLM)
    assert 300 * MiB < smollm < 450 * MiB  # 92 weights + 225 KV + 54 compute
    assert models.memory_estimate_bytes(GEMMA) > smollm
    assert models.memory_estimate_bytes("/nonexistent/model.gguf") == 0
    assert models.memory_available_bytes() is None  # no budget


def test_the_estimate_assumes_the_runtimes_prompt_chunk():
    from node_agent.runtime.llama_cpp import PROMPT_CHUNK_TOKENS as RUNTIME_CHUNK

    assert PROMPT_CHUNK_TOKENS == RUNTIME_CHUNK


def test_a_file_that_is_not_gguf_or_is_cut_short_is_refused(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(InvalidArgument) as caught:
        read_header(junk)
    assert caught.value.reason is Reason.NOT_GGUF
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_cached(SMOLLM).read_bytes()[:4096])
    with pytest.raises(InvalidArgument):
        read_header(cut)
    huge = tmp_path / "huge.gguf"  # a header that claims absurd counts
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40))
    with pytest.raises(InvalidArgument):
        read_header(huge)


def test_budgets_and_durations_parse():
    assert parse_budget("4GiB", 0) == 4 << 30
    assert parse_budget("512MB", 0) == 512_000_000
    assert parse_budget("800MiB", 0) == 800 * MiB
    assert parse_budget("1000", 0) == 1000
    assert parse_budget("80%", 1000) == 800
    for bad in ("", "lots", "0", "-1GiB", "150%", "0%", "4XB", "inf", "x%"):
        with pytest.raises(ValueError):
            parse_budget(bad, 1000)
    assert parse_duration("2s") == 2.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("1h") == 3600.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("30") == 30.0
    assert parse_duration("forever") is None
    with pytest.raises(ValueError):
        parse_duration("soon")


# --- the eviction decision --------------------------------------------------------------------


def _resident(name: str, mib: int, last_used: float, busy: bool = False) -> Resident:
    return Resident(name, mib * MiB, last_used, busy)


def test_a_load_that_fits_evicts_nothing():
    plan = plan_load(
        [_resident("a", 100, 1.0)], needed_bytes=100 * MiB, budget_bytes=300 * MiB, models_max=3
    )
    assert plan.evict == () and not plan.refusal


def test_idle_models_are_evicted_least_recently_used_first_until_it_fits():
    resident = [
        _resident("recent", 100, 30.0),
        _resident("oldest", 100, 10.0),
        _resident("older", 100, 20.0),
    ]
    plan = plan_load(resident, needed_bytes=150 * MiB, budget_bytes=300 * MiB, models_max=5)
    assert plan.evict == ("oldest", "older") and not plan.refusal


def test_the_model_count_evicts_too():
    resident = [_resident("a", 10, 2.0), _resident("b", 10, 1.0)]
    plan = plan_load(resident, needed_bytes=10 * MiB, budget_bytes=1 << 40, models_max=2)
    assert plan.evict == ("b",)


def test_a_busy_model_is_never_evicted_and_then_the_load_is_refused_with_nothing_evicted():
    resident = [_resident("busy", 200, 1.0, busy=True), _resident("idle", 50, 2.0)]
    plan = plan_load(resident, needed_bytes=200 * MiB, budget_bytes=300 * MiB, models_max=3)
    assert plan.evict == ()
    assert "needs 200 MiB" in plan.refusal and "only 100 MiB" in plan.refusal
    # Evicting the idle one is enough: the busy one stays.
    plan = plan_load(resident, needed_bytes=90 * MiB, budget_bytes=300 * MiB, models_max=3)
    assert plan.evict == ("idle",)
    full = plan_load(
        [_resident("busy", 1, 1.0, busy=True)], needed_bytes=1, budget_bytes=1 << 40, models_max=1
    )
    assert full.evict == () and "--models-max 1" in full.refusal


def test_a_model_bigger_than_the_whole_budget_is_refused_outright():
    plan = plan_load(
        [_resident("idle", 10, 1.0)], needed_bytes=2 << 30, budget_bytes=1 << 30, models_max=3
    )
    assert plan.evict == () and "whole memory budget" in plan.refusal


# --- the manager (simulated runtime: no weights) -------------------------------------------------


class CountingRuntime(SimulatedRuntime):
    def __init__(self) -> None:
        super().__init__(tokens_per_s=1000.0)
        self.loads = 0

    async def load(self, path, **kwargs):
        self.loads += 1
        await asyncio.sleep(0.2)
        return await super().load(path, **kwargs)


def _manager(runtime, **kwargs) -> ModelManager:
    return ModelManager(
        runtime, ModelStore(), default_slots=1, queue_limit=1, default_context=512, **kwargs
    )


def test_concurrent_loads_of_one_model_share_one_load_and_a_later_one_is_model_loaded():
    async def scenario():
        runtime = CountingRuntime()
        models = _manager(runtime)
        first, second = await asyncio.gather(models.load(SMOLLM), models.load(SMOLLM))
        assert first is second and runtime.loads == 1
        with pytest.raises(Exception) as again:
            await models.load(SMOLLM)
        assert again.value.reason is Reason.MODEL_LOADED

    asyncio.run(scenario())


def test_the_model_count_evicts_the_least_recently_used_idle_model():
    async def scenario():
        models = _manager(CountingRuntime(), models_max=1)
        await models.load(SMOLLM)
        await models.load(GEMMA)
        assert [m.name for m in models.hosted()] == [GEMMA]
        # A busy model is not evicted: the load is refused.
        async with models.get(GEMMA).pool.acquire():
            with pytest.raises(Exception) as refused:
                await models.load(SMOLLM)
            assert refused.value.reason is Reason.MODEL_TOO_BIG
        assert [m.name for m in models.hosted()] == [GEMMA]

    asyncio.run(scenario())


def test_idle_models_past_their_keep_alive_are_unloaded_and_kept_ones_stay():
    async def scenario():
        models = _manager(CountingRuntime(), keep_alive_s=0.3)
        await models.load(SMOLLM, keep_alive_s=None)  # as the daemon loads --models
        await models.load(GEMMA)
        assert await models.unload_idle() == []
        gemma = models.get(GEMMA)
        async with gemma.pool.acquire():  # busy past its keep-alive
            await asyncio.sleep(0.4)
            assert await models.unload_idle() == []
        assert await models.unload_idle() == []  # idle time restarts after the generation
        await asyncio.sleep(0.4)
        assert await models.unload_idle() == [GEMMA]
        assert [m.name for m in models.hosted()] == [SMOLLM]

    asyncio.run(scenario())


def test_on_battery_idle_models_go_sooner_and_kept_ones_still_stay():
    async def scenario():
        models = _manager(CountingRuntime(), keep_alive_s=300)
        await models.load(SMOLLM, keep_alive_s=None)
        await models.load(GEMMA)
        await asyncio.sleep(0.3)
        assert await models.unload_idle() == []  # on mains: 5 minutes
        assert await models.unload_idle(max_idle_s=0.2) == [GEMMA]  # on battery
        assert [m.name for m in models.hosted()] == [SMOLLM]

    asyncio.run(scenario())


# --- real nodes, real models ----------------------------------------------------------------------


def _loaded(stub) -> list[str]:
    return sorted(m.alias for m in stub.ListModels(node_pb2.ListModelsRequest()).loaded)


def test_estimate_against_what_loading_took(node_factory):
    """Printed, not asserted beyond a sanity bound: the estimate's error per model.

    The measure is the node's RSS growth around the load; llama.cpp maps the
    weights and touches the compute buffers only as it uses them, so RSS
    after a load is a floor of what the model holds once it generates."""
    _cached(SMOLLM), _cached(GEMMA)
    node = node_factory.start(models=SMOLLM)
    channel, stub = node_stub(node.address)
    with channel:
        stub.LoadModel(node_pb2.LoadModelRequest(model=GEMMA), timeout=300)
        loaded = {m.alias: m for m in stub.ListModels(node_pb2.ListModelsRequest()).loaded}
    for alias in (SMOLLM, GEMMA):
        model = loaded[alias]
        sequences = model.slots_total + model.continuation_slots_total
        found = estimate(
            read_header(_cached(alias)),
            context_per_slot=model.context_length,
            sequences=sequences,
            batch_tokens=PROMPT_CHUNK_TOKENS + sequences,
        )
        error = (found.total_bytes - model.memory_bytes) / model.memory_bytes
        print(
            f"\n{alias}: estimated {found.total_bytes / MiB:.0f} MiB "
            f"(weights {found.weights_bytes / MiB:.0f}, KV {found.kv_cache_bytes / MiB:.0f}, "
            f"compute {found.compute_bytes / MiB:.0f}), measured {model.memory_bytes / MiB:.0f}"
            f" MiB RSS: error {error:+.0%}"
        )
        assert model.memory_bytes / 2 <= found.total_bytes <= model.memory_bytes * 2


def test_a_budget_for_one_model_evicts_the_idle_one_but_never_a_busy_one(node_factory):
    # smollm2 is about 370 MiB by the estimate, gemma3 about 690: one fits, not both.
    _cached(SMOLLM), _cached(GEMMA)
    node = node_factory.start(models=SMOLLM, extra_args=("--memory-budget", "800MiB"))
    channel, stub = node_stub(node.address)
    load_gemma = node_pb2.LoadModelRequest(model=GEMMA)
    with channel:
        # At temperature 0 this prompt loops until max_tokens: smollm2 stays busy.
        running = stub.Generate(
            chat_request("Write a very long story.", temperature=0, max_tokens=1500)
        )
        next(running)  # admitted: a slot is held
        refused = rpc_error(lambda: stub.LoadModel(load_gemma, timeout=300))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(refused) is Reason.MODEL_TOO_BIG
        assert "needs" in refused.details() and "MiB" in refused.details()
        assert running.running() and _loaded(stub) == [SMOLLM]
        running.cancel()
        wait_until(
            lambda: stub.GetCapacity(node_pb2.GetCapacityRequest()).active_generations == 0,
            timeout_s=60,
            what="the generation to end",
        )
        # Idle now: loading gemma3 evicts it.
        stub.LoadModel(load_gemma, timeout=300)
        assert _loaded(stub) == [GEMMA]
        text = "".join(c.text for c in stub.Generate(chat_request(model=GEMMA, max_tokens=8)))
        assert text
        # And back: gemma3 is idle, smollm2 takes its place.
        stub.LoadModel(node_pb2.LoadModelRequest(model=SMOLLM), timeout=300)
        assert _loaded(stub) == [SMOLLM]
    assert node.alive()


def test_an_on_demand_model_is_unloaded_after_its_keep_alive_and_loads_are_shared(node_factory):
    _cached(SMOLLM), _cached(GEMMA)
    node = node_factory.start(
        models=SMOLLM, extra_args=("--keep-alive", "2s", "--idle-check", "0.5s")
    )
    channel, stub = node_stub(node.address)
    load_gemma = node_pb2.LoadModelRequest(model=GEMMA)
    with channel:
        # Two concurrent loads of one model: one load, both answered with it.
        answers: list[object] = []

        def load() -> None:
            try:
                answers.append(stub.LoadModel(load_gemma, timeout=300).alias)
            except grpc.RpcError as error:
                answers.append(error)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert answers == [GEMMA, GEMMA]
        already = rpc_error(lambda: stub.LoadModel(load_gemma, timeout=60))
        assert reason_of(already) is Reason.MODEL_LOADED
        # Idle past its keep-alive: unloaded; the model given at start stays.
        wait_until(lambda: _loaded(stub) == [SMOLLM], timeout_s=120, what="gemma3 unloaded")
        text = "".join(c.text for c in stub.Generate(chat_request(max_tokens=8)))
        assert text
    assert node.alive()


def test_the_models_given_at_start_never_evict_each_other(node_factory):
    """Start-up models that do not fit together: the node refuses to start."""
    _cached(SMOLLM), _cached(GEMMA)
    node = node_factory.start(
        models=f"{SMOLLM},{GEMMA}", wait=False, extra_args=("--memory-budget", "800MiB")
    )
    node.process.wait(timeout=180)
    assert node.process.returncode == 1
    log = node.log_path.read_text(errors="replace")
    assert "cannot load model gemma3-270m" in log and "--memory-budget" in log
