"""llama.cpp runtime (llama-cpp-python): GGUF models on CPU, or GPU offload.

A loaded model is one llama.cpp context whose KV cache holds a sequence per
slot; ``ContinuousBatcher`` decodes all running generations together (see
continuous_batching.py). This module loads the weights, formats chat prompts
and hands generations to the batcher.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import llama_cpp
import llama_cpp._logger as llama_cpp_logging
from llama_cpp._internals import LlamaContext, LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edgefleet.errors import FailedPrecondition, InvalidArgument, Reason
from node_agent.capacity import ThroughputMeter
from node_agent.runtime import cpu_backend
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
    StepTimings,
    grammar_sampler,
    resume_grammar,
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

# Tokenizers whose every token stands for at most its own piece's bytes of the
# input (byte-level BPE, SentencePiece): for them a prompt of more than
# context * longest-piece bytes surely does not fit, and is refused before
# it is tokenized. (WordPiece and Unigram drop or fold whitespace: no bound.)
BOUNDED_VOCABS = frozenset({llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE})

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
        # A portable build registers no CPU backend until one is loaded.
        self.cpu_backend = cpu_backend.ensure_loaded()
        if self.cpu_backend == "native":
            log.info("llama.cpp CPU backend: built for this machine's CPU (native build)")
        llama_cpp.llama_backend_init()
        llama_cpp_logging.set_verbose(False)  # llama.cpp logs debug lines per decode
        self._threads = max(1, threads or os.cpu_count() or 1)
        if gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            # A CPU-only build ignores the setting: saying 0 keeps the node's
            # report (and the coordinator's choice of variant) honest.
            log.warning("this llama.cpp build cannot offload to a GPU: --gpu-layers ignored")
            gpu_layers = 0
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
            gpu_layers=gpu_layers,
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
        token_bytes = await loop.run_in_executor(None, longest_token_bytes, model)
        batcher = ContinuousBatcher(
            model,
            context,
            sequences=slots,
            batch_tokens=batch_tokens,
            prompt_chunk=self._prompt_chunk,
            on_token=lambda: self._throughput.add(1),
        )
        return LlamaCppModel(
            model, batcher, info, chat_template=chat_template, max_token_bytes=token_bytes
        )

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


def longest_token_bytes(model: LlamaModel) -> int | None:
    """The most input bytes one token can stand for (its longest piece, special
    tokens' text included; 4 at least: an unknown character), or None when the
    tokenizer gives no such bound. Read once per load: one call per token."""
    vocab = model.vocab
    if llama_cpp.llama_vocab_type(vocab) not in BOUNDED_VOCABS:
        return None
    size = 256
    buffer = ctypes.create_string_buffer(size)
    longest = 4
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        # A negative answer is the size the piece needs: its length all the same.
        longest = max(
            longest, abs(llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True))
        )
    return longest


def adds_space_prefix(model: LlamaModel) -> bool:
    """Whether the tokenizer puts a space before every text it is given (older
    SentencePiece models): then a prompt tokenized in parts differs from the whole."""
    tokens = model.tokenize(b"a", add_bos=False, special=False)
    return bool(tokens) and model.token_to_piece(tokens[0], special=False).startswith(b" ")


class LlamaCppModel:
    def __init__(
        self,
        model: LlamaModel,
        batcher: ContinuousBatcher,
        info: ModelInfo,
        *,
        chat_template: str | None = None,
        max_token_bytes: int | None = None,
    ) -> None:
        self.info = info
        self._model = model
        self._batcher = batcher
        self._formatter = self._chat_formatter(model, chat_template)
        self._max_token_bytes = max_token_bytes
        self._split_prompts = not adds_space_prefix(model)

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
        """Template, a size check, tokens, the grammar checked. Runs in a worker
        thread (node.py): tokenizing reads only the vocabulary, which the decode
        loop never changes, so it is safe beside it (llama-server tokenizes in
        its HTTP threads the same way)."""
        messages = [
            {"role": TEMPLATE_ROLE.get(m.role, m.role), "content": m.content}
            for m in request.messages
        ]
        prompt = self._render(messages)
        self._check_size(
            len(prompt.encode("utf-8")) + len(request.assistant_prefix.encode("utf-8"))
        )
        tokens = self._prompt_tokens(messages, prompt)
        # The reply so far is the model's own text: never control tokens either.
        tokens += self._tokenize(request.assistant_prefix, special=False)
        if not tokens:
            raise InvalidArgument("the prompt is empty", reason=Reason.BAD_MESSAGES)
        check_prompt_fits(len(tokens), self.info.context_length)
        if request.grammar is not None:  # fail before queueing, not in the decode loop
            checked = grammar_sampler(self._model, request.grammar)
            if checked is None:
                raise InvalidArgument(
                    "invalid grammar: llama.cpp could not parse it", reason=Reason.BAD_GRAMMAR
                )
            # A continued reply: the grammar resumes after the text already sent.
            fits = resume_grammar(self._model, checked, request.assistant_prefix)
            llama_cpp.llama_sampler_free(checked)
            if not fits:
                raise InvalidArgument(
                    "assistant_prefix does not fit the output constraint (grammar or JSON schema)",
                    reason=Reason.BAD_GRAMMAR,
                )
        return PreparedPrompt(request=request, tokens=tuple(tokens))

    def _render(self, messages: list[dict]) -> str:
        try:
            return self._formatter(messages=messages).prompt
        except Exception as exc:  # a template may reject a message order
            raise InvalidArgument(
                f"the model's chat template rejected the messages: {str(exc)[:300]}",
                reason=Reason.BAD_MESSAGES,
            ) from exc

    def _check_size(self, prompt_bytes: int) -> None:
        """Refuse, before tokenizing, a prompt too long for any tokenization to fit."""
        if self._max_token_bytes is None:
            return
        most = self.info.context_length * self._max_token_bytes
        if prompt_bytes > most:
            raise InvalidArgument(
                f"the prompt is {prompt_bytes} bytes; the model's context window is "
                f"{self.info.context_length} tokens, which hold at most {most} bytes",
                reason=Reason.PROMPT_TOO_LONG,
            )

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        if not text:
            return []
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _prompt_tokens(self, messages: list[dict], prompt: str) -> list[int]:
        """The rendered prompt's tokens, with message content always plain text.

        The template's own markers (``<|im_start|>``, ...) become control
        tokens; the same characters typed in a message stay text, so no one
        can open a system turn from inside a user message. The template is
        rendered again with a random sentinel in place of each content, which
        tells the template's text from the messages' text.
        """
        segments = self._segments(messages, prompt) if self._split_prompts else None
        if segments is None:
            # The template changes content in a way the sentinels cannot follow
            # (or the tokenizer cannot be run in parts): the whole prompt at once,
            # which is safe only when no content holds control-token text.
            for message in messages:
                if any(
                    self._is_control(t) for t in self._tokenize(message["content"], special=True)
                ):
                    raise InvalidArgument(
                        "a message contains the text of one of the model's control tokens, "
                        "and this model's chat template cannot keep it as plain text",
                        reason=Reason.BAD_MESSAGES,
                    )
            return self._tokenize(prompt, special=True)
        tokens: list[int] = []
        for text, is_template in segments:
            tokens += self._tokenize(text, special=is_template)
        return tokens

    def _is_control(self, token: int) -> bool:
        attributes = llama_cpp.llama_vocab_get_attr(self._model.vocab, token)
        return bool(
            attributes & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
        )

    def _segments(self, messages: list[dict], prompt: str) -> list[tuple[str, bool]] | None:
        """``prompt`` cut into (text, is_template) pieces, or None when the
        template's output cannot be matched to the messages."""
        nonce = secrets.token_hex(8)
        sentinels = {f"\ue000{nonce}.{i}\ue001": i for i in range(len(messages))}
        skeleton = self._render(
            [{**m, "content": s} for m, s in zip(messages, sentinels, strict=True)]
        )
        pieces: list[tuple[str, int | None]] = []  # template text, or a message index
        rest = skeleton
        while True:
            start = rest.find(f"\ue000{nonce}.")
            if start < 0:
                pieces.append((rest, None))
                break
            end = rest.find("\ue001", start)
            index = sentinels.get(rest[start : end + 1]) if end > 0 else None
            if index is None:
                return None
            pieces.append((rest[:start], None))
            pieces.append(("", index))
            rest = rest[end + 1 :]
        # Walk the real prompt along the skeleton; a template may trim content.
        segments: list[tuple[str, bool]] = []
        position = 0
        for number, (text, index) in enumerate(pieces):
            if index is None:
                if not prompt.startswith(text, position):
                    return None
                segments.append((text, True))
                position += len(text)
                continue
            content = messages[index]["content"]
            following = pieces[number + 1][0] if number + 1 < len(pieces) else ""
            for variant in dict.fromkeys(
                (content, content.strip(), content.lstrip(), content.rstrip())
            ):
                end = position + len(variant)
                if prompt.startswith(variant, position) and prompt.startswith(following, end):
                    segments.append((variant, False))
                    position = end
                    break
            else:
                return None
        return segments if position == len(prompt) else None

    def cached_prefix(self, slot: int, prompt: PreparedPrompt) -> int:
        return self._batcher.cached_prefix(slot, prompt.tokens)

    def step_timings(self) -> StepTimings:
        return self._batcher.timings

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
            grammar_prefix=prompt.request.assistant_prefix,
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
