"""The node: its state and what it does, whoever asks.

``Node`` owns what a node is at any moment (draining or not, generations
running, the models it hosts) and builds its capacity report. Its callers are
siblings that each speak to one party: the gRPC servicer (``service.py``) to
coordinators and tools, the registrar to the fleet, the metrics to Prometheus,
the simulated fleet to benchmarks. None of them keeps node state of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.catalog import CATALOG
from edgefleet.errors import Reason, error_of
from edgefleet.model_store import sendable_size
from edgefleet.v1 import common_pb2, node_pb2
from node_agent.capacity import GpuProbe, HostProbe, ThroughputMeter, models_gpu
from node_agent.models import DEFAULT, HostedModel, ModelManager
from node_agent.requests import generation_request_from_proto, off_loop
from node_agent.runtime.base import GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)

MAX_ORIGIN_CHARS = 128  # GenerateRequest.origin: a coordinator id and a process tag

# Choosing a free slot: the one whose cache holds the most of the prompt, when
# that is worth taking a slot for: a long shared prefix (a conversation's
# history) or most of the prompt however short (an agent's repeated system
# prompt and question). A few shared tokens (the chat template's opening,
# which every prompt has) do not count, so they never evict another
# conversation's cache: the least recently used slot is taken instead.
LONG_PREFIX_TOKENS = 64


def slot_value(shared: int, prompt_tokens: int) -> int:
    """How good a free slot is for a prompt of ``prompt_tokens`` whose first
    ``shared`` tokens its cache holds (0: no better than any other)."""
    if shared >= LONG_PREFIX_TOKENS or 2 * shared >= prompt_tokens:
        return shared
    return 0


@dataclass(frozen=True)
class Admitted:
    """A generation got its slot after ``queue_ms`` in the queue."""

    model: str
    slot: int
    queue_ms: float
    admitted_ns: int  # wall clock, for spans


@dataclass(frozen=True)
class Queued:
    """A generation has to wait for a slot; ``position`` in the queue, from 1."""

    position: int


class Node:
    def __init__(
        self,
        *,
        node_id: str,
        models: ModelManager,
        host: HostProbe,
        gpus: GpuProbe,
        throughput: ThroughputMeter,
    ) -> None:
        self.node_id = node_id
        self.models = models
        self._host = host
        self._gpus = gpus
        self._throughput = throughput
        self._started = False  # start-up (loading the configured models) is done
        self._draining = False
        self._active = 0
        self._sends = 0  # model files being sent to peers
        # Generations in a slot or queued, per coordinator (request.origin).
        self._by_origin: collections.Counter[str] = collections.Counter()
        # Set when slots are taken or given back, so a fresh report can go out
        # at once instead of at the next heartbeat tick.
        self.capacity_changed = asyncio.Event()
        self._serving_listeners: list[Callable[[bool], Awaitable[None]]] = []

    # --- state ---------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active_generations(self) -> int:
        return self._active

    @property
    def serving(self) -> bool:
        """Takes new generations: started, not draining, and some model is loaded."""
        return self._started and not self._draining and bool(self.models.hosted())

    async def started(self) -> None:
        """Start-up is over (the configured models are loaded): health may say SERVING."""
        self._started = True
        await self._serving_changed()

    def on_serving_change(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Call ``listener(serving)`` whenever drain or the loaded models change."""
        self._serving_listeners.append(listener)

    async def _serving_changed(self) -> None:
        for listener in self._serving_listeners:
            await listener(self.serving)

    async def set_draining(self, draining: bool) -> None:
        self._draining = draining
        log.info("drain=%s (active generations: %d)", draining, self._active)
        await self._serving_changed()

    # --- models ------------------------------------------------------------------------
    async def load_model(
        self,
        name: str,
        *,
        slots: int = 0,
        context_length: int = 0,
        source: common_pb2.ModelFile | None = None,
        keep_alive_s: float | object | None = DEFAULT,
        peers: list[node_pb2.ModelPeer] | None = None,
    ):
        model = await self.models.load(
            name,
            slots=slots,
            context_length=context_length,
            source=source,
            keep_alive_s=keep_alive_s,
            peers=peers or [],
        )
        await self._serving_changed()
        return model

    async def unload_model(self, name: str) -> None:
        await self.models.unload(name)
        await self._serving_changed()

    # --- model files for peers ----------------------------------------------------------
    MAX_SENDS = 2  # model files sent to peers at once

    def shared_file(self, alias: str, sha256: str, offset: int) -> tuple[Path, int]:
        """The file a peer asks for (path, size), or MODEL_NOT_CACHED / INVALID_REQUEST."""
        path = self.models.store.file_for(alias, sha256)
        missing = f"node {self.node_id} holds no file of {alias[:80]!r} with that sha256"
        return path, sendable_size(path, offset, missing)

    @contextlib.asynccontextmanager
    async def sending(self, alias: str, peer: str):
        """Room to send a file to a peer (False: MAX_SENDS already going)."""
        if self._sends >= self.MAX_SENDS:
            yield False
            return
        self._sends += 1
        log.info("sending %s to %s", alias, peer)
        try:
            yield True
        finally:
            self._sends -= 1

    def catalog(self) -> list[node_pb2.CatalogModel]:
        loaded = {model.name for model in self.models.hosted()}
        store = self.models.store
        return [
            node_pb2.CatalogModel(
                alias=entry.alias,
                description=entry.description,
                quantization=entry.quantization,
                size_bytes=entry.size_bytes,
                cached=store.is_cached(entry),
                loaded=entry.alias in loaded,
            )
            for entry in CATALOG.values()
        ]

    # --- generation ----------------------------------------------------------------------
    async def generate(
        self, request: node_pb2.GenerateRequest
    ) -> AsyncIterator[Queued | Admitted | GenerationEvent]:
        """``Queued`` if it has to wait, ``Admitted`` once a slot is held, then
        the runtime's events.

        Refusals (draining, model not loaded, bad request, full queue) raise
        before ``Admitted``; closing the iterator cancels the generation.
        """
        arrived_ns = time.time_ns()
        if len(request.origin) > MAX_ORIGIN_CHARS:
            raise error_of(
                Reason.INVALID_REQUEST, f"origin is longer than {MAX_ORIGIN_CHARS} characters"
            )
        if self._draining:
            raise error_of(Reason.NODE_DRAINING, "node is draining and takes no new generations")
        model = self.models.get(request.model)
        # Schema to grammar, template and tokens: off the event loop (requests.py).
        generation = await off_loop(generation_request_from_proto, request)
        self._check_supported(generation)
        prepared = await off_loop(model.instance.prepare, generation)
        # A continued reply (its start was sent by a node that failed, and only
        # a coordinator says so) has a user waiting mid-sentence: it may take a
        # reserved slot and otherwise waits at the head of the queue. Among
        # free slots, one already holding much of this prompt (a
        # conversation's history); otherwise the least recently used.
        continuation = request.continuation
        if model.pool.would_queue(continuation=continuation):
            yield Queued(model.pool.next_position(continuation=continuation))
        # Counted per origin exactly while the pool counts it (slot or queue):
        # the pool takes or refuses synchronously, so no report falls between.
        self._by_origin[request.origin] += 1
        try:
            async with model.pool.acquire(
                continuation=continuation,
                prefer=lambda slot: slot_value(
                    model.instance.cached_prefix(slot, prepared), len(prepared.tokens)
                ),
            ) as slot:
                admitted_ns = time.time_ns()
                self._active += 1
                self.capacity_changed.set()
                try:
                    yield Admitted(model.name, slot, (admitted_ns - arrived_ns) / 1e6, admitted_ns)
                    stream = model.instance.stream(slot, prepared)
                    try:
                        async for event in stream:
                            yield event
                    finally:
                        await stream.aclose()
                finally:
                    self._active -= 1
                    self.capacity_changed.set()
        finally:
            self._by_origin[request.origin] -= 1
            if self._by_origin[request.origin] <= 0:
                del self._by_origin[request.origin]

    def _check_supported(self, generation: GenerationRequest) -> None:
        capabilities = self.models.capabilities
        if generation.grammar is not None and not capabilities.grammar:
            raise error_of(
                Reason.RUNTIME_UNSUPPORTED, "this node's runtime cannot constrain its output"
            )
        if generation.assistant_prefix and not capabilities.prefix_continuation:
            raise error_of(
                Reason.RUNTIME_UNSUPPORTED, "this node's runtime cannot continue a reply"
            )

    # --- capacity ------------------------------------------------------------------------
    # The catalog models this node could load, as last looked up in its store:
    # (loaded models when looked, monotonic time, the list). Looked up again when
    # a model was loaded or unloaded, and every STORE_RECHECK_S (a pull by hand).
    _stored: tuple[frozenset[str], float, list[common_pb2.StoredModel]] | None = None
    STORE_RECHECK_S = 30.0
    # Memory each cached catalog model would take (GGUF headers, read in a thread).
    _estimates: dict[str, int] | None = None
    _estimating = False

    def stored_models(self) -> list[common_pb2.StoredModel]:
        """Catalog models the node could load on request, each marked cached
        when its file is in the model store (a load then needs no transfer),
        with the memory it would take once the node has estimated it."""
        loaded = frozenset(model.name for model in self.models.hosted())
        now = time.monotonic()
        if (
            self._stored is None
            or self._stored[0] != loaded
            or now - self._stored[1] > self.STORE_RECHECK_S
        ):
            store = self.models.store
            estimates = self._estimates or {}
            stored = [
                common_pb2.StoredModel(
                    alias=entry.alias,
                    size_bytes=entry.size_bytes,
                    cached=not self.models.capabilities.needs_weights or store.is_cached(entry),
                    memory_estimate_bytes=estimates.get(entry.alias, 0),
                )
                for entry in CATALOG.values()
            ]
            if self.models.capabilities.needs_weights:
                # Fleet models fetched before: a load needs no transfer.
                stored += [
                    common_pb2.StoredModel(alias=alias, size_bytes=size, cached=True)
                    for alias, size in sorted(store.fleet_models().items())
                ]
            self._stored = (loaded, now, stored)
            if any(s.cached and not s.memory_estimate_bytes for s in stored):
                self._estimate_stored()
        return self._stored[2]

    def _estimate_stored(self) -> None:
        """Read the cached models' estimates off the event loop; the next report has them."""
        if self._estimating or not self.models.capabilities.needs_weights:
            return

        def read() -> dict[str, int]:
            return {alias: self.models.memory_estimate_bytes(alias) for alias in CATALOG}

        def done(future) -> None:
            self._estimating = False
            if not future.cancelled() and future.exception() is None:
                self._estimates = future.result()
                self._stored = None  # rebuilt with the estimates

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a one-off report): without estimates
        self._estimating = True
        loop.run_in_executor(None, read).add_done_callback(done)

    def model_memory_available(self, host_available: int) -> int:
        """Memory for more models: what the budget has left, at most what the
        host has free (the host's free memory where no budget is set)."""
        budget_left = self.models.memory_available_bytes()
        return host_available if budget_left is None else min(budget_left, host_available)

    def capacity(self) -> common_pb2.Capacity:
        host = self._host.read()
        gpus = self._gpus.read()
        models = [loaded_model(model) for model in self.models.hosted()]
        # Free memory where models live (models_gpu: as the budget is counted).
        free = host.memory_available_bytes
        if (gpu := models_gpu(self.models.capabilities.gpu_layers, gpus)) is not None:
            free = max(0, gpu.memory_total_bytes - gpu.memory_used_bytes)
        return common_pb2.Capacity(
            cpu_count=host.cpu_count,
            cpu_percent=host.cpu_percent,
            load_average_1m=host.load_average_1m,
            memory_total_bytes=host.memory_total_bytes,
            memory_available_bytes=host.memory_available_bytes,
            process_rss_bytes=host.process_rss_bytes,
            models=models,
            slots_total=sum(m.slots_total for m in models),
            slots_free=sum(m.slots_free for m in models),
            queue_depth=sum(m.queue_depth for m in models),
            queue_limit=sum(m.queue_limit for m in models),
            tokens_per_second=self._throughput.rate(),
            gpus=[
                common_pb2.GpuInfo(
                    index=gpu.index,
                    name=gpu.name,
                    memory_total_bytes=gpu.memory_total_bytes,
                    memory_used_bytes=gpu.memory_used_bytes,
                    utilization_percent=gpu.utilization_percent,
                )
                for gpu in gpus
            ],
            draining=self._draining,
            active_generations=self._active,
            simulated=bool(models) and self.models.capabilities.simulated,
            stored_models=self.stored_models(),
            model_memory_available_bytes=self.model_memory_available(free),
            active_by_origin={origin: n for origin, n in self._by_origin.items() if origin},
            fetches=self.models.fetcher.fetches() if self.models.fetcher is not None else [],
            power=power_report(self._host.power()),
            counts_origins=True,
            gpu_layers=self.models.capabilities.gpu_layers,
        )


def loaded_model(model: HostedModel) -> common_pb2.LoadedModel:
    info = model.instance.info
    return common_pb2.LoadedModel(
        alias=model.name,
        path=str(info.path),
        quantization=info.quantization,
        runtime=info.runtime,
        file_size_bytes=info.file_size_bytes,
        memory_bytes=info.memory_bytes,
        context_length=info.context_length,
        slots_total=model.pool.total,
        slots_free=model.pool.free,
        continuation_slots_total=model.pool.reserved,
        continuation_slots_free=model.pool.reserve_free,
        queue_depth=model.pool.queue_depth,
        queue_limit=model.pool.queue_limit,
        sha256=model.sha256,
        gpu_layers=info.gpu_layers,
    )


def power_report(power) -> common_pb2.Power:
    return common_pb2.Power(
        on_battery=power.on_battery,
        battery_percent=power.battery_percent,
        temperature_c=power.temperature_c,
        throttled=power.throttled,
        low_power=power.low_power,
    )
