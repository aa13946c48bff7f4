"""The interface every inference runtime implements.

A runtime loads a model file into a ``ModelInstance`` with a number of
parallel slots; the node's admission control hands each generation a slot
index, and the instance streams ``TextDelta`` events and one final ``Finish``.
A new engine (vLLM, a simulator for benchmarks) is one new module.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgefleet.errors import InvalidArgument, Reason
from edgefleet.generation import Message, Sampling


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    CONTEXT_FULL = "context_full"
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    # Assistant text already produced (e.g. by a node that failed); the
    # generation continues it and never repeats it.
    assistant_prefix: str = ""
    # A GBNF grammar constraining the output, or None.
    grammar: str | None = None


@dataclass(frozen=True)
class PreparedPrompt:
    """A request turned into prompt tokens, checked against the context."""

    request: GenerationRequest
    tokens: tuple[int, ...]


def check_prompt_fits(prompt_tokens: int, context_length: int) -> None:
    """Every runtime's rule: the prompt must leave room for a reply."""
    if prompt_tokens >= context_length:
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens but the model's context window is "
            f"{context_length} tokens",
            reason=Reason.PROMPT_TOO_LONG,
        )


def generation_limit(
    sampling: Sampling, prompt_tokens: int, context_length: int
) -> tuple[int, FinishReason]:
    """Most tokens to generate, and the finish reason when that many are."""
    room = context_length - prompt_tokens
    if sampling.max_tokens is not None and sampling.max_tokens <= room:
        return sampling.max_tokens, FinishReason.LENGTH
    return room, FinishReason.CONTEXT_FULL


@dataclass(frozen=True)
class TextDelta:
    text: str
    tokens: int


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    prompt_ms: float
    generation_ms: float
    time_to_first_token_ms: float


GenerationEvent = TextDelta | Finish


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    runtime: str
    context_length: int
    slots: int
    file_size_bytes: int
    memory_bytes: int
    quantization: str
    gpu_layers: int = 0


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do, declared once; callers read this, not its name."""

    grammar: bool  # constrains output with a GBNF grammar (json_schema, forced tool calls)
    prefix_continuation: bool  # continues an assistant_prefix without repeating it
    prefix_cache: bool  # keeps each slot's KV cache, so a repeated prefix is not re-read
    gpu: bool  # offloads layers to a GPU
    needs_weights: bool  # loads a model file from the store (the simulator does not)
    simulated: bool = False  # fake tokens for control-plane benchmarks, never real text
    gpu_layers: int = 0  # layers each load places on a GPU (-1: all, 0: none)


class ModelInstance(Protocol):
    info: ModelInfo

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """Tokenize; raise InvalidArgument when the prompt does not fit."""
        ...

    def cached_prefix(self, slot: int, prompt: PreparedPrompt) -> int:
        """Prompt tokens ``slot`` (idle) already holds in its cache."""
        ...

    def stream(self, slot: int, prompt: PreparedPrompt) -> AsyncIterator[GenerationEvent]:
        """Generate in ``slot``; closing the iterator cancels the generation."""
        ...

    async def unload(self) -> None: ...


class Runtime(Protocol):
    name: str
    capabilities: Capabilities

    async def load(
        self,
        path: Path,
        *,
        slots: int,
        context_length: int,
        quantization: str,
        chat_template: str | None = None,
    ) -> ModelInstance:
        """Load a model; ``chat_template`` is used when the file has none."""
        ...

    def close(self) -> None: ...
