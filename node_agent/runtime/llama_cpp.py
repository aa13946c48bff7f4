"""llama.cpp runtime (llama-cpp-python): GGUF models on CPU, or GPU offload.

A loaded model is one llama.cpp context whose KV cache holds a sequence per
slot; ``ContinuousBatcher`` decodes all running generations together (see
continuous_batching.py). This module loads the weights, formats chat prompts
and hands generations to the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import llama_cpp
import llama_cpp._logger as llama_cpp_logging
from llama_cpp._internals import LlamaContext, LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edgefleet.errors import FailedPrecondition, InvalidArgument, Reason
from node_agent.capacity import ThroughputMeter
from node_agent.runtime.base import (
    Capabilities,
    Finish,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PreparedPrompt,
    check_prompt_fits,
    generation_limit,
)
from node_agent.runtime.continuous_batching import (
    ContinuousBatcher,
    Generation,
    grammar_sampler,
)

log = logging.getLogger(__name__)

# Used when a GGUF carries no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Roles templates know; "developer" is OpenAI's newer name for "system".
TEMPLATE_ROLE = {"developer": "system"}

# Prompt tokens read per decode step, beside one token per generating stream:
# small enough that a long prompt does not stall the others for long.
PROMPT_CHUNK_TOKENS = 256


class LlamaCppRuntime:
    name = "llama.cpp"

    def __init__(
        self,
        *,
        threads: int | None = None,
        gpu_layers: int = 0,
        throughput: ThroughputMeter | None = None,
        rss: Callable[[], int] | None = None,
        prompt_chunk: int = PROMPT_CHUNK_TOKENS,
    ) -> None:
        llama_cpp.llama_backend_init()
        llama_cpp_logging.set_verbose(False)  # llama.cpp logs debug lines per decode
        self._threads = max(1, threads or os.cpu_count() or 1)
        self._gpu_layers = gpu_layers
        self._throughput = throughput or ThroughputMeter()
        self._rss = rss or (lambda: 0)
        self._prompt_chunk = prompt_chunk
        self.capabilities = Capabilities(
            grammar=True,
            prefix_continuation=True,
            prefix_cache=True,
            gpu=gpu_layers != 0,
            needs_weights=True,
        )

    async def load(
        self,
        path: Path,
        *,
        slots: int,
        context_length: int,
        quantization: str,
        chat_template: str | None = None,
    ) -> LlamaCppModel:
        loop = asyncio.get_running_loop()
        rss_before = self._rss()
        file_size = os.path.getsize(path)
        # A decode step holds a token per slot plus one prompt chunk.
        batch_tokens = self._prompt_chunk + slots
        model, context = await loop.run_in_executor(
            None, self._open, path, slots, context_length, batch_tokens
        )
        info = ModelInfo(
            path=path,
            runtime=self.name,
            context_length=context_length,
            slots=slots,
            file_size_bytes=file_size,
            memory_bytes=max(0, self._rss() - rss_before),
            quantization=quantization,
            gpu_layers=self._gpu_layers,
        )
        batcher = ContinuousBatcher(
            model,
            context,
            sequences=slots,
            batch_tokens=batch_tokens,
            prompt_chunk=self._prompt_chunk,
            on_token=lambda: self._throughput.add(1),
        )
        return LlamaCppModel(model, batcher, info, chat_template=chat_template)

    def _open(
        self, path: Path, slots: int, context_length: int, batch_tokens: int
    ) -> tuple[LlamaModel, LlamaContext]:
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = self._gpu_layers
        try:
            model = LlamaModel(path_model=str(path), params=model_params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise FailedPrecondition(
                f"llama.cpp could not load {path}: {exc}", reason=Reason.MODEL_LOAD_FAILED
            ) from exc
        params = llama_cpp.llama_context_default_params()
        # A KV stream per slot, each a full context window. Separate streams
        # (not one unified cache) plus flash attention keep every sequence's
        # numerics independent of what else is in the batch: a stream's text
        # at temperature 0 is the same alone or batched (tests/test_batching.py).
        # Flash attention is also llama-server's default on CPU; its rounding
        # differs from llama-cpp-python's default (no flash attention), so
        # greedy text can differ from a plain ``Llama`` call on the same model.
        params.n_ctx = context_length * slots
        params.n_seq_max = slots
        params.kv_unified = False
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self._gpu_layers == 0
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_threads = params.n_threads_batch = self._threads
        params.no_perf = True
        try:
            context = LlamaContext(model=model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            model.close()
            raise FailedPrecondition(
                f"llama.cpp could not create a {params.n_ctx}-token context for {path}: {exc}",
                reason=Reason.MODEL_LOAD_FAILED,
            ) from exc
        return model, context

    def close(self) -> None:
        pass


class LlamaCppModel:
    def __init__(
        self,
        model: LlamaModel,
        batcher: ContinuousBatcher,
        info: ModelInfo,
        *,
        chat_template: str | None = None,
    ) -> None:
        self.info = info
        self._model = model
        self._batcher = batcher
        self._formatter = self._chat_formatter(model, chat_template)

    @staticmethod
    def _chat_formatter(model: LlamaModel, fallback: str | None) -> Jinja2ChatFormatter:
        def token_text(token: int) -> str:
            return model.token_get_text(token) if token != -1 else ""

        return Jinja2ChatFormatter(
            template=model.metadata().get("tokenizer.chat_template") or fallback or CHATML_TEMPLATE,
            eos_token=token_text(model.token_eos()),
            bos_token=token_text(model.token_bos()),
            add_generation_prompt=True,
        )

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        messages = [
            {"role": TEMPLATE_ROLE.get(m.role, m.role), "content": m.content}
            for m in request.messages
        ]
        try:
            prompt = self._formatter(messages=messages).prompt
        except Exception as exc:  # a template may reject a message order
            raise InvalidArgument(
                f"the model's chat template rejected the messages: {exc}",
                reason=Reason.BAD_MESSAGES,
            ) from exc
        prompt += request.assistant_prefix
        tokens = self._model.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if not tokens:
            raise InvalidArgument("the prompt is empty", reason=Reason.BAD_MESSAGES)
        check_prompt_fits(len(tokens), self.info.context_length)
        if request.grammar is not None:  # fail before queueing, not in the decode loop
            checked = grammar_sampler(self._model, request.grammar)
            if checked is None:
                raise InvalidArgument(
                    "invalid grammar: llama.cpp could not parse it", reason=Reason.BAD_GRAMMAR
                )
            llama_cpp.llama_sampler_free(checked)
        return PreparedPrompt(request=request, tokens=tuple(tokens))

    def cached_prefix(self, slot: int, prompt: PreparedPrompt) -> int:
        return self._batcher.cached_prefix(slot, prompt.tokens)

    async def stream(self, slot: int, prompt: PreparedPrompt) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        released = loop.create_future()

        def on_released() -> None:
            if not released.done():
                released.set_result(None)

        sampling = prompt.request.sampling
        limit, length_reason = generation_limit(
            sampling, len(prompt.tokens), self.info.context_length
        )
        generation = Generation(
            seq_id=slot,
            prompt=list(prompt.tokens),
            sampling=sampling,
            grammar=prompt.request.grammar,
            limit=limit,
            length_reason=length_reason,
            emit=events.put_nowait,
            on_released=on_released,
            loop=loop,
        )
        self._batcher.submit(generation)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            # Closing the stream (client gone, error) drops the sequence at the
            # next decode step; the slot is only reused once the loop let go.
            generation.cancel.set()
            await asyncio.shield(released)

    async def unload(self) -> None:
        await asyncio.to_thread(self._batcher.close)
