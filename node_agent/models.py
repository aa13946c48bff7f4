"""The models a node has loaded: each a runtime instance plus its slot pool."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from edgefleet import telemetry
from edgefleet.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Reason
from node_agent.catalog import ModelRef, resolve
from node_agent.runtime.base import Capabilities, ModelInstance, Runtime
from node_agent.slots import SlotPool
from node_agent.store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class HostedModel:
    name: str
    ref: ModelRef
    instance: ModelInstance
    pool: SlotPool
    sha256: str


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
    ) -> None:
        self._runtime = runtime
        self._store = store
        self._default_slots = default_slots
        self._queue_limit = queue_limit
        self._default_context = default_context
        self._continuation_slots = continuation_slots
        self._models: dict[str, HostedModel] = {}
        self._lock = asyncio.Lock()

    @property
    def capabilities(self) -> Capabilities:
        return self._runtime.capabilities

    @property
    def store(self) -> ModelStore:
        return self._store

    def hosted(self) -> list[HostedModel]:
        return list(self._models.values())

    def get(self, name: str) -> HostedModel:
        ref = resolve(name)  # NotFound / InvalidArgument for unknown names
        model = self._models.get(ref.name)
        if model is None:
            loaded = ", ".join(self._models) or "none"
            raise FailedPrecondition(
                f"model {ref.name!r} is not loaded on this node (loaded: {loaded})",
                reason=Reason.MODEL_NOT_LOADED,
            )
        return model

    async def load(self, name: str, *, slots: int = 0, context_length: int = 0) -> HostedModel:
        if slots < 0 or context_length < 0:
            raise InvalidArgument(
                "slots and context_length must be >= 0", reason=Reason.INVALID_REQUEST
            )
        ref = resolve(name)
        async with self._lock:
            if ref.name in self._models:
                raise AlreadyExists(
                    f"model {ref.name!r} is already loaded", reason=Reason.MODEL_LOADED
                )
            if self.capabilities.needs_weights:
                path, sha256 = await asyncio.to_thread(self._store.verified_path, ref)
            else:  # the benchmark simulator
                path, sha256 = Path(f"simulated/{ref.name}"), ""
            slots = slots or self._default_slots
            context = context_length or self._default_context
            if ref.entry is not None:
                context = min(context, ref.entry.trained_context)
            quantization = ref.entry.quantization if ref.entry else _quantization_from(path)
            log.info("loading %s (%s) with %d slot(s), context %d", ref.name, path, slots, context)
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
            )
            self._models[ref.name] = model
            log.info("loaded %s: %d MiB", ref.name, instance.info.memory_bytes >> 20)
            return model

    async def unload(self, name: str, *, grace_s: float = 30.0) -> None:
        model = self.get(name)
        async with self._lock:
            self._models.pop(model.name, None)
            model.pool.close()
            # Let running generations finish; the runtime cancels the rest.
            await model.pool.wait_idle(grace_s)
            await model.instance.unload()
            log.info("unloaded %s", model.name)

    async def unload_all(self) -> None:
        for name in list(self._models):
            await self.unload(name, grace_s=0)


_QUANT = re.compile(r"(?<![A-Z0-9])(IQ\d[A-Z0-9_]*|Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Z0-9])")


def _quantization_from(path: Path) -> str:
    """Best guess from a file name such as model.Q4_K_M.gguf."""
    match = _QUANT.search(path.stem.upper())
    return match.group(1) if match else "unknown"
