"""Continuous batching: every generation of a model decoded in one llama.cpp context.

One thread owns the context and runs the decode loop. Each slot is a
sequence id with its own KV stream in the context. At every step the loop puts one token per
generating sequence and a chunk of pending prompt tokens into a single batch,
decodes it, and samples each sequence that asked for logits with that
sequence's own sampler chain. A new request joins at the next step; a
finished or cancelled one leaves at the next step; a long prompt is read a
chunk per step so it never freezes the streams already generating.

Prefix reuse: the loop remembers which tokens each sequence has in the cache.
A new prompt keeps the longest matching prefix, from its own slot or, when
another slot holds a much longer one, copied from there, and only the rest is
read. A session's next turn therefore re-reads only the new messages,
whichever slot it lands on.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel, LlamaSampler

from edgefleet.errors import Reason, Unavailable, error_of
from edgefleet.generation import Sampling
from node_agent.runtime.base import Finish, FinishReason, GenerationEvent, TextDelta
from node_agent.text_stream import StopStringFilter, TokenTextDecoder

log = logging.getLogger(__name__)

# llama-cpp-python's own default: how many recent tokens the penalties see.
PENALTY_LAST_N = 64

# Copying another slot's cache moves a whole KV stream (tens of MB); below
# this many tokens gained, reading them again is about as fast. (The node
# first picks the free slot that holds most of the prompt, so a copy is only
# for when that slot is busy.)
MIN_COPY_TOKENS = 128

Emit = Callable[[GenerationEvent | BaseException], None]


@dataclass
class StepTimings:
    """Where the decode loop's time goes, summed since the model was loaded
    (read at any time; the node exports them as metrics, the benchmark
    reports them per step).

    The decode thread writes every field but the hand-off delay, which the
    event loop writes as it runs each step's events.
    """

    steps: int = 0
    generated_tokens: int = 0  # tokens decoded for a generating stream
    prompt_tokens: int = 0  # prompt tokens decoded
    admit_s: float = 0.0  # admitting and cancelling (cache lookups, samplers)
    batch_s: float = 0.0  # building the batch
    decode_s: float = 0.0  # llama_decode
    sample_s: float = 0.0  # sampling, detokenizing, stop strings
    handoff_s: float = 0.0  # posting the step's events to the event loops
    handoff_delay_s: float = 0.0  # from posting to the event loop running them
    handoffs: int = 0


@dataclass(eq=False)
class Generation:
    """One request in flight; owned by the decode loop once submitted."""

    seq_id: int
    prompt: list[int]
    sampling: Sampling
    grammar: str | None  # GBNF, rule "root"
    limit: int  # most tokens to generate
    length_reason: FinishReason  # why we stop at ``limit``
    # Both run on ``loop`` (the caller's event loop), never on the decode thread.
    emit: Emit
    on_released: Callable[[], None]  # the sequence no longer uses the context
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # Loop-side state.
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    n_past: int = 0  # tokens of this sequence in the KV cache
    cached_prompt_tokens: int = 0
    next_token: int | None = None  # sampled, not yet decoded
    completion: int = 0
    first_token_at: float | None = None
    sampler: LlamaSampler | None = None
    decoder: TokenTextDecoder = field(default_factory=TokenTextDecoder)
    stops: StopStringFilter | None = None
    # Reply text already sent (a continued reply): the grammar resumes after it.
    grammar_prefix: str = ""


class ContinuousBatcher:
    """The decode loop of one loaded model (one thread, one context)."""

    def __init__(
        self,
        model: LlamaModel,
        context: LlamaContext,
        *,
        sequences: int,
        batch_tokens: int,
        prompt_chunk: int,
        on_token: Callable[[], None] = lambda: None,
    ) -> None:
        self._model = model
        self._ctx = context
        self._memory = llama_cpp.llama_get_memory(context.ctx)
        self._vocab = model.vocab
        self._batch_tokens = batch_tokens
        self._prompt_chunk = max(1, min(prompt_chunk, batch_tokens - sequences))
        self._on_token = on_token
        self._batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        # What each sequence id holds in the KV cache, token by token.
        self._cached: list[list[int]] = [[] for _ in range(sequences)]
        self._incoming: collections.deque[Generation] = collections.deque()
        self._active: list[Generation] = []
        # Events for the callers' event loops, handed over once per step:
        # one wake-up of the loop per step, not one per token per stream.
        self._outbox: list[tuple[asyncio.AbstractEventLoop, Callable, tuple]] = []
        self._wake = threading.Condition()
        self._closing = False
        self.timings = StepTimings()
        self._thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------

    def submit(self, generation: Generation) -> None:
        with self._wake:
            if self._closing:
                raise Unavailable("the model is being unloaded", reason=Reason.MODEL_UNLOADING)
            self._incoming.append(generation)
            self._wake.notify()

    def cached_prefix(self, seq: int, tokens) -> int:
        """Tokens of ``tokens`` sequence ``seq`` holds; for an idle sequence
        (the loop does not touch those), e.g. to choose a slot."""
        return _common_prefix(self._cached[seq], tokens)

    def close(self) -> None:
        """Cancel everything, stop the loop and free the context."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()
        self._model.close()

    # -- the loop thread -------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._incoming or self._active or self._closing):
                    self._wake.wait()
                refused: list[Generation] = []
                if self._closing:
                    refused = list(self._incoming)
                    self._incoming.clear()
                    for generation in self._active:
                        generation.cancel.set()
                admitted = list(self._incoming)
                self._incoming.clear()
            for generation in refused:  # never started: nothing to finish
                self._emit(
                    generation,
                    Unavailable("the model is being unloaded", reason=Reason.MODEL_UNLOADING),
                )
                self._post(generation, generation.on_released)
            timings = self.timings
            started = time.perf_counter()
            for generation in admitted:
                try:
                    self._admit(generation)
                except Exception as exc:  # e.g. a sampler llama.cpp refused: fail this one only
                    log.exception("could not start a generation")
                    self._emit(
                        generation, error_of(Reason.GENERATION_FAILED, f"generation failed: {exc}")
                    )
                    self._forget(generation.seq_id)
                    self._post(generation, generation.on_released)
            for generation in [g for g in self._active if g.cancel.is_set()]:
                self._finish(generation, FinishReason.CANCELLED)
            if self._closing and not self._active:
                self._flush()
                return
            timings.admit_s += time.perf_counter() - started
            try:
                self._step()
            except Exception as exc:  # a failed decode fails its sequences, not the node
                log.exception("batched decode failed")
                for generation in list(self._active):
                    self._fail(
                        generation, error_of(Reason.GENERATION_FAILED, f"generation failed: {exc}")
                    )
            finally:
                started = time.perf_counter()
                self._flush()
                timings.handoff_s += time.perf_counter() - started

    def _emit(self, generation: Generation, event: GenerationEvent | BaseException) -> None:
        self._post(generation, generation.emit, event)

    def _post(self, generation: Generation, callback: Callable, *args) -> None:
        self._outbox.append((generation.loop, callback, args))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, callback, args in outbox:
            by_loop.setdefault(loop, []).append((callback, args))
        posted = time.perf_counter()
        for loop, calls in by_loop.items():
            try:
                loop.call_soon_threadsafe(_run_all, calls, posted, self.timings)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _admit(self, generation: Generation) -> None:
        seq = generation.seq_id
        prompt = generation.prompt
        # Keep at least one prompt token to decode: its logits start the reply.
        own = min(_common_prefix(self._cached[seq], prompt), len(prompt) - 1)
        donor, shared = seq, own
        for other, tokens in enumerate(self._cached):
            if other != seq:
                length = min(_common_prefix(tokens, prompt), len(prompt) - 1)
                if length > shared and length - own >= MIN_COPY_TOKENS:
                    donor, shared = other, length
        if donor != seq:
            # Each sequence has its own KV stream: copy the donor's stream
            # whole (llama.cpp copies streams only whole), then cut it.
            llama_cpp.llama_memory_seq_cp(self._memory, donor, seq, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._memory, seq, shared, -1)
        elif not llama_cpp.llama_memory_seq_rm(self._memory, seq, shared, -1):
            # Partial removal is not supported by every cache type.
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            shared = 0
        self._cached[seq] = prompt[:shared]
        generation.n_past = shared
        generation.cached_prompt_tokens = shared
        generation.pending = prompt[shared:]
        generation.sampler = _sampler(self._model, generation)
        generation.stops = StopStringFilter(list(generation.sampling.stop))
        self._active.append(generation)

    def _step(self) -> None:
        """Decode one batch: a token per generating sequence, then prompt chunks."""
        timings = self.timings
        started = time.perf_counter()
        plan = plan_step(self._active, self._prompt_chunk, self._batch_tokens)
        outputs: list[tuple[Generation, int]] = []
        n = 0
        for generation, tokens, wants_logits in plan:
            if generation.next_token is not None:
                timings.generated_tokens += 1
            else:
                timings.prompt_tokens += len(tokens)
            for i, token in enumerate(tokens):
                last = wants_logits and i == len(tokens) - 1
                self._put(n, token, generation, logits=last)
                if last:
                    outputs.append((generation, n))
                n += 1
        if n == 0:
            return
        batch = self._batch
        batch.n_tokens = n
        built = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        decoded = time.perf_counter()
        timings.steps += 1
        timings.batch_s += built - started
        timings.decode_s += decoded - built
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for generation, index in outputs:
            self._sample(generation, index)
        timings.sample_s += time.perf_counter() - decoded

    def _put(self, i: int, token: int, generation: Generation, *, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = generation.n_past
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = generation.seq_id
        batch.logits[i] = logits
        generation.n_past += 1
        self._cached[generation.seq_id].append(token)

    def _sample(self, generation: Generation, index: int) -> None:
        generation.next_token = None
        token = llama_cpp.llama_sampler_sample(generation.sampler.sampler, self._ctx.ctx, index)
        if generation.first_token_at is None:
            generation.first_token_at = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(generation, FinishReason.STOP)
            return
        generation.completion += 1
        self._on_token()
        text = generation.stops.feed(
            generation.decoder.feed(self._model.detokenize([token], special=False))
        )
        if generation.stops.stopped:
            if text:
                self._emit(generation, TextDelta(text, 1))
            self._finish(generation, FinishReason.STOP_SEQUENCE)
            return
        self._emit(generation, TextDelta(text, 1))
        if generation.completion >= generation.limit:
            self._finish(generation, generation.length_reason)
            return
        generation.next_token = token

    def _finish(self, generation: Generation, reason: FinishReason) -> None:
        stops = generation.stops
        if reason not in (FinishReason.STOP_SEQUENCE, FinishReason.CANCELLED):
            tail = stops.feed(generation.decoder.flush()) + stops.flush()
            if stops.stopped:
                reason = FinishReason.STOP_SEQUENCE
            if tail:
                self._emit(generation, TextDelta(tail, 0))
        finished = time.perf_counter()
        first = generation.first_token_at or finished
        self._emit(
            generation,
            Finish(
                reason=reason,
                prompt_tokens=len(generation.prompt),
                completion_tokens=generation.completion,
                cached_prompt_tokens=generation.cached_prompt_tokens,
                prompt_ms=(first - generation.submitted) * 1000,
                generation_ms=(finished - first) * 1000,
                time_to_first_token_ms=(first - generation.submitted) * 1000,
            ),
        )
        self._release(generation)

    def _fail(self, generation: Generation, error: BaseException) -> None:
        self._forget(generation.seq_id)  # its cache is in an unknown state
        self._emit(generation, error)
        self._release(generation)

    def _forget(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._cached[seq] = []

    def _release(self, generation: Generation) -> None:
        self._active.remove(generation)
        if generation.sampler is not None:
            generation.sampler.close()
        self._post(generation, generation.on_released)


def plan_step(
    active: list[Generation], prompt_chunk: int, batch_tokens: int
) -> list[tuple[Generation, list[int], bool]]:
    """What one decode step holds: (generation, its tokens, whether its last
    token's logits are wanted), in ascending sequence id.

    Every generating sequence puts its next token; prompts are read oldest
    request first, ``prompt_chunk`` tokens in all (taken off their
    ``pending``), within ``batch_tokens``. The order matters for speed: with
    a KV stream per sequence, a batch in the order slots happened to be taken
    in cost a third more ``llama_decode`` time per step at 8 streams than the
    same batch in ascending id (94-115 ms vs 63-75 ms, measured on the node's
    own path in process; issue 16's notes).
    """
    work: dict[Generation, tuple[list[int], bool]] = {}
    for generation in active:
        if generation.next_token is not None:
            work[generation] = ([generation.next_token], True)
    budget = min(prompt_chunk, batch_tokens - len(work))
    for generation in active:
        if budget <= 0:
            break
        if not generation.pending:
            continue
        chunk = generation.pending[:budget]
        del generation.pending[: len(chunk)]
        budget -= len(chunk)
        work[generation] = (chunk, not generation.pending)  # logits once the prompt is read
    return [(g, *work[g]) for g in sorted(work, key=lambda g: g.seq_id)]


def _run_all(calls: list[tuple[Callable, tuple]], posted: float, timings: StepTimings) -> None:
    timings.handoff_delay_s += time.perf_counter() - posted
    timings.handoffs += 1
    for callback, args in calls:
        callback(*args)


def _sampler(model: LlamaModel, generation: Generation) -> LlamaSampler:
    """The same chain llama-cpp-python's ``Llama.generate`` builds."""
    sampling = generation.sampling
    sampler = LlamaSampler()
    sampler.add_penalties(
        n_vocab=model.n_vocab(),
        penalty_last_n=PENALTY_LAST_N,
        penalty_repeat=sampling.repeat_penalty,
        penalty_freq=sampling.frequency_penalty,
        penalty_present=sampling.presence_penalty,
    )
    if generation.grammar is not None:
        grammar = grammar_sampler(model, generation.grammar)
        if grammar is None:
            sampler.close()
            raise ValueError("llama.cpp could not parse the grammar")
        if not resume_grammar(model, grammar, generation.grammar_prefix):
            llama_cpp.llama_sampler_free(grammar)
            sampler.close()
            raise ValueError("the reply so far does not fit the grammar")
        llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)  # the chain owns it now
    if sampling.temperature == 0.0:
        sampler.add_greedy()
    else:
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        sampler.add_top_k(sampling.top_k)
        sampler.add_top_p(sampling.top_p, 1)
        sampler.add_min_p(sampling.min_p, 1)
        sampler.add_temp(sampling.temperature)
        sampler.add_dist(seed & 0xFFFFFFFF)
    return sampler


def grammar_sampler(model: LlamaModel, gbnf: str):
    """A llama.cpp grammar sampler, or None when the grammar does not parse."""
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
    return sampler or None


def resume_grammar(model: LlamaModel, grammar, text: str) -> bool:
    """Advance a grammar sampler over ``text``, the reply so far (sent by a node
    that failed), so a continued reply goes on from that point of the grammar
    instead of starting it over. False if the text does not fit the grammar.

    Each token is checked before it is accepted: llama.cpp aborts the process
    when a grammar is made to accept a token it does not allow.
    """
    if not text:
        return True
    for token in model.tokenize(text.encode("utf-8"), add_bos=False, special=False):
        cell = llama_cpp.llama_token_data(id=token, logit=0.0, p=0.0)
        candidates = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(cell), size=1, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(candidates))
        if math.isinf(cell.logit):
            return False
        llama_cpp.llama_sampler_accept(grammar, token)
    return True


def _common_prefix(cached: list[int], tokens: list[int]) -> int:
    count = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        count += 1
    return count
