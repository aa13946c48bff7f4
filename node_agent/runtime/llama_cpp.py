"""llama.cpp runtime (llama-cpp-python): GGUF models on CPU, or GPU offload.

Each slot of a model is its own llama.cpp context over the same memory-mapped
weights, so slots generate truly in parallel and each keeps its own KV cache
(a session's next turn on the same slot reuses its prefix). The CPU cores are
shared out among the generations running at the moment: one stream gets all
of them, several get a share each, which avoids oversubscribing the cores
with llama.cpp's spinning worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edgefleet.errors import FailedPrecondition, InvalidArgument
from edgefleet.generation import Sampling
from node_agent.capacity import ThroughputMeter
from node_agent.runtime.base import (
    Finish,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PreparedPrompt,
    TextDelta,
)
from node_agent.text_stream import StopStringFilter, TokenTextDecoder

log = logging.getLogger(__name__)

# Used when a GGUF carries no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Roles templates know; "developer" is OpenAI's newer name for "system".
TEMPLATE_ROLE = {"developer": "system"}


class CpuShare:
    """Splits the node's inference threads among the generations running now."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._active = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self):
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def per_generation(self) -> int:
        return max(1, self.threads // max(1, self._active))


class LlamaCppRuntime:
    name = "llama.cpp"

    def __init__(
        self,
        *,
        threads: int | None = None,
        gpu_layers: int = 0,
        throughput: ThroughputMeter | None = None,
        rss: Callable[[], int] | None = None,
    ) -> None:
        self._cpu = CpuShare(threads or os.cpu_count() or 1)
        self._gpu_layers = gpu_layers
        self._throughput = throughput or ThroughputMeter()
        self._rss = rss or (lambda: 0)

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
        contexts = await loop.run_in_executor(
            None, self._open_contexts, path, slots, context_length
        )
        info = ModelInfo(
            path=path,
            runtime=self.name,
            context_length=contexts[0].n_ctx(),
            slots=slots,
            file_size_bytes=file_size,
            memory_bytes=max(0, self._rss() - rss_before),
            quantization=quantization,
            gpu_layers=self._gpu_layers,
        )
        return LlamaCppModel(
            contexts,
            info,
            cpu=self._cpu,
            throughput=self._throughput,
            chat_template=chat_template,
        )

    def _open_contexts(self, path: Path, slots: int, context_length: int) -> list[Llama]:
        contexts = []
        try:
            for _ in range(slots):
                contexts.append(
                    Llama(
                        model_path=str(path),
                        n_ctx=context_length,
                        n_threads=self._cpu.threads,
                        n_threads_batch=self._cpu.threads,
                        n_gpu_layers=self._gpu_layers,
                        verbose=False,
                    )
                )
        except (ValueError, RuntimeError) as exc:
            for llm in contexts:
                llm.close()
            raise FailedPrecondition(f"llama.cpp could not load {path}: {exc}") from exc
        return contexts

    def close(self) -> None:
        pass


class LlamaCppModel:
    def __init__(
        self,
        contexts: list[Llama],
        info: ModelInfo,
        *,
        cpu: CpuShare,
        throughput: ThroughputMeter,
        chat_template: str | None = None,
    ) -> None:
        self.info = info
        self._contexts = contexts
        self._cpu = cpu
        self._throughput = throughput
        self._executor = ThreadPoolExecutor(
            max_workers=len(contexts), thread_name_prefix="llama-slot"
        )
        first = contexts[0]
        self._vocab = first._model.vocab
        self._running: set[threading.Event] = set()
        self._formatter = self._chat_formatter(first, chat_template)

    @staticmethod
    def _chat_formatter(llm: Llama, fallback: str | None) -> Jinja2ChatFormatter:
        def token_text(token: int) -> str:
            return llm._model.token_get_text(token) if token != -1 else ""

        return Jinja2ChatFormatter(
            template=llm.metadata.get("tokenizer.chat_template") or fallback or CHATML_TEMPLATE,
            eos_token=token_text(llm.token_eos()),
            bos_token=token_text(llm.token_bos()),
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
                f"the model's chat template rejected the messages: {exc}"
            ) from exc
        prompt += request.assistant_prefix
        tokens = self._contexts[0].tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if len(tokens) >= self.info.context_length:
            raise InvalidArgument(
                f"the prompt is {len(tokens)} tokens but the model's context window is "
                f"{self.info.context_length} tokens"
            )
        if request.grammar is not None:
            _parse_grammar(request.grammar)  # fail before queueing, not in the slot
        return PreparedPrompt(request=request, tokens=tuple(tokens))

    async def stream(self, slot: int, prompt: PreparedPrompt) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        cancel = threading.Event()
        self._running.add(cancel)

        def emit(event: GenerationEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        worker = loop.run_in_executor(
            self._executor, self._generate, self._contexts[slot], prompt, emit, cancel
        )
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            # Closing the stream (client gone, error) stops the worker at its
            # next token; the slot is only reused once the worker has let go.
            cancel.set()
            await asyncio.shield(worker)
            self._running.discard(cancel)

    def _generate(
        self,
        llm: Llama,
        prompt: PreparedPrompt,
        emit: Callable[[GenerationEvent | BaseException], None],
        cancel: threading.Event,
    ) -> None:
        try:
            with self._cpu.running():
                emit(self._generate_in_slot(llm, prompt, emit, cancel))
        except BaseException as exc:  # surfaced to the awaiting coroutine
            log.exception("generation failed")
            emit(FailedPrecondition(f"generation failed: {exc}"))

    def _generate_in_slot(
        self,
        llm: Llama,
        prompt: PreparedPrompt,
        emit: Callable[[GenerationEvent | BaseException], None],
        cancel: threading.Event,
    ) -> Finish:
        sampling: Sampling = prompt.request.sampling
        tokens = list(prompt.tokens)
        room = self.info.context_length - len(tokens)
        limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
        length_reason = (
            FinishReason.CONTEXT_FULL
            if sampling.max_tokens is None or sampling.max_tokens > room
            else FinishReason.LENGTH
        )
        cached = _common_prefix(llm.input_ids[: llm.n_tokens], tokens)
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        llm.set_seed(seed & 0xFFFFFFFF)
        grammar = _parse_grammar(prompt.request.grammar) if prompt.request.grammar else None

        decoder = TokenTextDecoder()
        stops = StopStringFilter(list(sampling.stop))
        threads = 0
        completion = 0
        reason = length_reason
        started = time.perf_counter()
        first_token_at: float | None = None
        generator = llm.generate(
            tokens,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            grammar=grammar,
        )
        try:
            while completion < limit:
                wanted = self._cpu.per_generation()
                if wanted != threads:
                    llama_cpp.llama_set_n_threads(llm.ctx, wanted, wanted)
                    threads = wanted
                token = next(generator)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if cancel.is_set():
                    reason = FinishReason.CANCELLED
                    break
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = FinishReason.STOP
                    break
                completion += 1
                self._throughput.add(1)
                text = stops.feed(decoder.feed(llm._model.detokenize([token], special=False)))
                if stops.stopped:
                    if text:
                        emit(TextDelta(text, 1))
                    reason = FinishReason.STOP_SEQUENCE
                    break
                emit(TextDelta(text, 1))
        finally:
            generator.close()
        if reason is not FinishReason.STOP_SEQUENCE and reason is not FinishReason.CANCELLED:
            tail = stops.feed(decoder.flush())
            tail += stops.flush()
            if stops.stopped:
                reason = FinishReason.STOP_SEQUENCE
            if tail:
                emit(TextDelta(tail, 0))
        finished = time.perf_counter()
        first = first_token_at or finished
        return Finish(
            reason=reason,
            prompt_tokens=len(tokens),
            completion_tokens=completion,
            cached_prompt_tokens=cached,
            prompt_ms=(first - started) * 1000,
            generation_ms=(finished - first) * 1000,
            time_to_first_token_ms=(first - started) * 1000,
        )

    async def unload(self) -> None:
        for cancel in list(self._running):
            cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        for llm in self._contexts:
            llm.close()
        self._contexts.clear()


def _common_prefix(cached, tokens: list[int]) -> int:
    """Prompt tokens llama.cpp will reuse from the slot's KV cache."""
    count = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        count += 1
    # llama-cpp-python re-evaluates the last prompt token to refresh logits.
    return min(count, len(tokens) - 1) if count else 0


def _parse_grammar(gbnf: str) -> LlamaGrammar:
    try:
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except Exception as exc:
        raise InvalidArgument(f"invalid grammar: {exc}") from exc
