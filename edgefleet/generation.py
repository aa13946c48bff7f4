"""What a generation asks for, and the rules a request must follow.

Both daemons check requests with these functions: the coordinator before it
places a request, the node before it queues one. Every rule answers
INVALID_ARGUMENT with a named reason and a message naming the field.

``continued`` is the one rule for resuming a reply elsewhere (the router after
a node failed, the client after a coordinator replica failed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgefleet.errors import InvalidArgument, Reason
from edgefleet.v1 import common_pb2

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_TOKENS_LIMIT = 131072  # no node holds a longer context
REPEAT_PENALTY_LIMIT = 10.0
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
MAX_MESSAGES = 4096
# Initial metadata a node sends when a generation waits for a slot: its queue
# position, so the coordinator does not take a queued request for a stalled one.
QUEUED_METADATA_KEY = "edgefleet-queued"


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; defaults follow llama.cpp's server."""

    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def _plain_number(name: str, value: float) -> None:
    """NaN, infinities and denormals are refused: they mean nothing as a setting
    and make samplers misbehave in ways no one can see."""
    if not math.isfinite(value) or (value != 0.0 and abs(value) < FLOAT32_MIN_NORMAL):
        raise InvalidArgument(
            f"sampling.{name} must be a plain finite number, got {value!r}",
            reason=Reason.BAD_SAMPLING,
        )


def sampling_from_proto(params: common_pb2.SamplingParams) -> Sampling:
    defaults = Sampling()
    for name in ("temperature", "top_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
        if params.HasField(name):
            _plain_number(name, getattr(params, name))
    max_tokens = params.max_tokens if params.HasField("max_tokens") else None
    if max_tokens is not None and not 0 < max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgument(
            f"sampling.max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_tokens}",
            reason=Reason.BAD_SAMPLING,
        )
    temperature = params.temperature if params.HasField("temperature") else defaults.temperature
    if not 0.0 <= temperature <= 2.0:
        raise InvalidArgument(
            f"sampling.temperature must be in [0, 2], got {temperature:g}",
            reason=Reason.BAD_SAMPLING,
        )
    top_p = params.top_p if params.HasField("top_p") else defaults.top_p
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(
            f"sampling.top_p must be in (0, 1], got {top_p:g}", reason=Reason.BAD_SAMPLING
        )
    top_k = params.top_k if params.HasField("top_k") else defaults.top_k
    if top_k < 0:
        raise InvalidArgument(
            f"sampling.top_k must be >= 0, got {top_k}", reason=Reason.BAD_SAMPLING
        )
    stops = tuple(params.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgument(
            f"sampling.stop allows at most {MAX_STOP_STRINGS} strings", reason=Reason.BAD_STOP
        )
    if any(not stop or len(stop) > MAX_STOP_LENGTH for stop in stops):
        raise InvalidArgument(
            f"sampling.stop strings must be 1-{MAX_STOP_LENGTH} characters",
            reason=Reason.BAD_STOP,
        )
    repeat_penalty = (
        params.repeat_penalty if params.HasField("repeat_penalty") else defaults.repeat_penalty
    )
    if not 0 < repeat_penalty <= REPEAT_PENALTY_LIMIT:
        raise InvalidArgument(
            f"sampling.repeat_penalty must be in (0, {REPEAT_PENALTY_LIMIT:g}], "
            f"got {repeat_penalty:g}",
            reason=Reason.BAD_SAMPLING,
        )
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name) if params.HasField(name) else 0.0
        if not -2.0 <= value <= 2.0:
            raise InvalidArgument(
                f"sampling.{name} must be in [-2, 2], got {value:g}", reason=Reason.BAD_SAMPLING
            )
        penalties[name] = value
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stops,
        seed=params.seed if params.HasField("seed") else None,
        repeat_penalty=repeat_penalty,
        **penalties,
    )


def messages_from_proto(messages) -> tuple[Message, ...]:
    if not messages:
        raise InvalidArgument("messages must not be empty", reason=Reason.BAD_MESSAGES)
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(
            f"messages allows at most {MAX_MESSAGES} entries", reason=Reason.BAD_MESSAGES
        )
    converted = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(
                f"messages[{index}].role {message.role!r} is not one of {', '.join(sorted(ROLES))}",
                reason=Reason.BAD_MESSAGES,
            )
        converted.append(Message(role=message.role, content=message.content))
    return tuple(converted)


def continued(request, sent_text: str, sent_tokens: int):
    """The same request, continuing after the reply text the client already has.

    Works on any request message with ``assistant_prefix`` and ``sampling``
    (GenerateRequest, ChatRequest, CompleteRequest): the text sent so far
    becomes part of the assistant prefix (so it is neither lost nor repeated)
    and ``max_tokens`` shrinks by the tokens sent. None when no token is left.
    """
    resumed = type(request)()
    resumed.CopyFrom(request)
    resumed.assistant_prefix = request.assistant_prefix + sent_text
    if request.sampling.HasField("max_tokens"):
        left = request.sampling.max_tokens - sent_tokens
        if left <= 0:
            return None
        resumed.sampling.max_tokens = left
    return resumed


def count_carried_tokens(usage: common_pb2.Usage, carried_tokens: int) -> None:
    """Make a resumed attempt's final usage cover the whole reply: tokens
    generated by earlier attempts came back as prompt (prefix) tokens."""
    if carried_tokens:
        usage.completion_tokens += carried_tokens
        usage.prompt_tokens = max(0, usage.prompt_tokens - carried_tokens)


def sampling_params(
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    stop: str | list[str] | tuple[str, ...] | None = None,
) -> common_pb2.SamplingParams:
    """SamplingParams with only the settings a client gave (None: the default)."""
    params = common_pb2.SamplingParams()
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ):
        if value is not None:
            setattr(params, name, value)
    if stop is not None:
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    return params
