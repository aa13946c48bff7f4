"""A SIMULATED runtime for control-plane benchmarks: no model, no inference.

It emits tokens at a fixed rate per stream so that a benchmark can put
thousands of nodes and streams on one small machine and measure what the
coordinator, etcd and placement cost, which real inference would drown out.
It is never a default: a node runs it only when started with
``--runtime simulated``, and then reports ``simulated: true`` in its capacity,
which ``edgefleet status`` shows. Nothing outside ``bench/`` and its tests
uses it.

Each token's text is the monotonic clock (ns) at the moment the simulator
emitted it, followed by a space, so a client on the same machine can measure
the latency everything downstream of the node adds, token by token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from node_agent.runtime.base import (
    Capabilities,
    Finish,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PreparedPrompt,
    TextDelta,
    check_prompt_fits,
    generation_limit,
)

NAME = "simulated"


class SimulatedRuntime:
    name = NAME
    capabilities = Capabilities(
        grammar=False,
        prefix_continuation=True,  # it emits fake tokens after any prefix
        prefix_cache=False,
        gpu=False,
        needs_weights=False,  # the model manager must not look for a model file
        simulated=True,
    )

    def __init__(
        self,
        *,
        tokens_per_s: float = 20.0,
        prompt_tokens_per_s: float = 2000.0,
        cold_start_s: float = 0.0,
    ) -> None:
        if tokens_per_s <= 0 or prompt_tokens_per_s <= 0 or cold_start_s < 0:
            raise ValueError("simulated rates must be > 0 and cold start >= 0")
        self.tokens_per_s = tokens_per_s
        self.prompt_tokens_per_s = prompt_tokens_per_s
        self.cold_start_s = cold_start_s

    async def load(
        self,
        path: Path,
        *,
        slots: int,
        context_length: int,
        quantization: str,
        chat_template: str | None = None,
    ) -> SimulatedModel:
        info = ModelInfo(
            path=path,
            runtime=NAME,
            context_length=context_length,
            slots=slots,
            file_size_bytes=0,
            memory_bytes=0,
            quantization=quantization,
        )
        return SimulatedModel(info, self)

    def close(self) -> None:
        pass


class SimulatedModel:
    def __init__(self, info: ModelInfo, runtime: SimulatedRuntime) -> None:
        self.info = info
        self._runtime = runtime
        # "Cold": the first generation pays for loading the weights.
        self._warm = asyncio.Event()
        self._warming = False
        if runtime.cold_start_s == 0:
            self._warm.set()

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        text = " ".join(m.content for m in request.messages) + request.assistant_prefix
        count = max(1, len(text.split()))
        check_prompt_fits(count, self.info.context_length)
        return PreparedPrompt(request=request, tokens=tuple(range(count)))

    def cached_prefix(self, slot: int, prompt: PreparedPrompt) -> int:
        return 0

    async def stream(self, slot: int, prompt: PreparedPrompt) -> AsyncIterator[GenerationEvent]:
        started = time.perf_counter()
        await self._warm_up()
        runtime = self._runtime
        await asyncio.sleep(len(prompt.tokens) / runtime.prompt_tokens_per_s)
        limit, length_reason = generation_limit(
            prompt.request.sampling, len(prompt.tokens), self.info.context_length
        )
        interval = 1.0 / runtime.tokens_per_s
        first = time.perf_counter()
        next_at = time.monotonic()
        for index in range(limit):
            if index:
                # Pace on a schedule, not sleep-per-token, so the rate holds
                # even when the event loop is busy.
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            yield TextDelta(f"{time.monotonic_ns()} ", 1)
        finished = time.perf_counter()
        yield Finish(
            reason=length_reason,
            prompt_tokens=len(prompt.tokens),
            completion_tokens=limit,
            cached_prompt_tokens=0,
            prompt_ms=(first - started) * 1000,
            generation_ms=(finished - first) * 1000,
            time_to_first_token_ms=(first - started) * 1000,
        )

    async def _warm_up(self) -> None:
        if self._warm.is_set():
            return
        if not self._warming:
            self._warming = True
            await asyncio.sleep(self._runtime.cold_start_s)
            self._warm.set()
        await self._warm.wait()

    async def unload(self) -> None:
        pass
