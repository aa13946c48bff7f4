"""How much memory a model will take, from its GGUF header, before loading it.

``read_header`` reads only the header (key/values and tensor descriptions,
never the weights; the long tokenizer arrays are skipped, not decoded:
``gguf.GGUFReader`` decodes every token and takes tens of seconds on a
262k-token vocabulary). ``estimate`` is a pure function of the header's fields
and how the runtime will load the model (``node_agent/runtime/llama_cpp.py``):

- weights: the tensors' data size (the file minus its header);
- KV cache: n_layer x n_ctx_total x (n_head_kv x head_dim for K plus for V)
  x 2 bytes (f16), where n_ctx_total = context per slot x (slots +
  continuation slots): one full KV stream per sequence. Sliding-window layers
  (Gemma 3) get a full-size cache too, as llama.cpp allocates it by default;
- compute buffers: the logits of one micro-batch (n_vocab x batch tokens x 4
  bytes; llama.cpp reserves the graph for a full prompt chunk) plus the output
  buffer (n_vocab x sequences x 4) plus ``COMPUTE_BASE_BYTES`` for the rest of
  the graph. Measured on llama.cpp's CPU backend, these match its logged
  compute buffer sizes within a few MiB for SmolLM2 and Gemma 3.

The node corrects the estimate by what loading actually took (RSS around the
load, ``ModelInfo.memory_bytes``): a loaded model counts as the larger of the two.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from edgefleet.errors import InvalidArgument, Reason

GGUF_MAGIC = b"GGUF"
KV_BYTES_PER_ELEMENT = 2  # f16 K and V, llama.cpp's default cache type
COMPUTE_BASE_BYTES = 4 << 20  # graph intermediates beyond the logits
# Tokens of a prompt decoded per step by the llama.cpp runtime
# (node_agent/runtime/llama_cpp.py; a test keeps the two equal).
PROMPT_CHUNK_TOKENS = 256
# Bounds on what a header may declare (a hostile or corrupt file).
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_STRING = 1 << 24
MAX_ARRAY = 1 << 24

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GgufHeader:
    """The fields of a GGUF header that decide its memory."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int  # the largest, where the header lists one per layer
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    trained_context: int
    weights_bytes: int
    parameters: int = 0  # elements in every tensor
    file_type: str = ""  # general.file_type by name ("Q4_K_M"); "" when absent


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes


def estimate(
    header: GgufHeader, *, context_per_slot: int, sequences: int, batch_tokens: int
) -> MemoryEstimate:
    """Memory for ``header``'s model loaded with ``sequences`` KV streams
    (slots + continuation slots) of ``context_per_slot`` tokens each, decoding
    ``batch_tokens`` tokens per step at most."""
    n_ctx_total = context_per_slot * sequences
    per_token = header.n_head_kv * (header.head_dim_k + header.head_dim_v)
    kv = header.n_layer * n_ctx_total * per_token * KV_BYTES_PER_ELEMENT
    compute = header.n_vocab * 4 * (batch_tokens + sequences) + COMPUTE_BASE_BYTES
    return MemoryEstimate(header.weights_bytes, kv, compute)


# --- budgets and eviction ------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_UNITS.update({"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4})
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})


def parse_budget(text: str, total_bytes: int) -> int:
    """``4GiB``, ``512MB``, ``2000000000`` or ``80%`` (of ``total_bytes``) in bytes
    (ValueError when it is none of those or not positive)."""
    value = text.strip().replace(" ", "").upper()
    unreadable = ValueError(f"a memory budget of {text!r}: say bytes (4GiB, 512MB) or a percent")
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            raise unreadable from None
        if not 0 < percent <= 100:
            raise ValueError(f"a memory budget of {text!r}: the percent must be in (0, 100]")
        return int(total_bytes * percent / 100)
    digits = value.rstrip("KMGTIB")
    unit = value[len(digits) :]
    if unit not in _UNITS or not digits:
        raise unreadable
    try:
        amount = int(float(digits) * _UNITS[unit])
    except (ValueError, OverflowError):
        raise unreadable from None
    if amount <= 0:
        raise ValueError(f"a memory budget of {text!r} must be positive")
    return amount


def parse_duration(text: str) -> float | None:
    """``300``, ``30s``, ``5m``, ``1h`` in seconds; ``forever`` (or ``-1``) is None."""
    value = text.strip().lower()
    if value in ("forever", "-1", "inf"):
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    number, unit = value, 1.0
    for suffix in ("ms", "s", "m", "h"):
        if value.endswith(suffix):
            number, unit = value[: -len(suffix)], scale[suffix]
            break
    try:
        seconds = float(number) * unit
    except ValueError:
        raise ValueError(f"a duration of {text!r}: say 30s, 5m, 1h or forever") from None
    if seconds < 0:
        raise ValueError(f"a duration of {text!r} must be >= 0 (or 'forever')")
    return seconds


def format_bytes(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class Resident:
    """A loaded model as eviction sees it."""

    name: str
    memory_bytes: int
    last_used: float  # monotonic seconds
    busy: bool  # a running or queued generation


@dataclass(frozen=True)
class LoadPlan:
    """Evict ``evict`` (in this order), then load; or, with ``refusal``, do nothing."""

    evict: tuple[str, ...] = ()
    refusal: str = ""


def plan_load(
    resident: list[Resident], *, needed_bytes: int, budget_bytes: int, models_max: int
) -> LoadPlan:
    """What loading a model of ``needed_bytes`` takes: the idle models to evict,
    least recently used first, until it fits both the budget and the count; or
    why it cannot (a busy model is never evicted; nothing is evicted for a
    load that would be refused anyway)."""
    if needed_bytes > budget_bytes:
        return LoadPlan(
            refusal=f"the model needs {format_bytes(needed_bytes)}, more than this node's "
            f"whole memory budget ({format_bytes(budget_bytes)})"
        )
    used = sum(model.memory_bytes for model in resident)
    count = len(resident)
    evict: list[str] = []
    for model in sorted((m for m in resident if not m.busy), key=lambda m: m.last_used):
        if used + needed_bytes <= budget_bytes and count < models_max:
            break
        evict.append(model.name)
        used -= model.memory_bytes
        count -= 1
    if used + needed_bytes > budget_bytes:
        return LoadPlan(
            refusal=f"the model needs {format_bytes(needed_bytes)} but only "
            f"{format_bytes(budget_bytes - used)} of the {format_bytes(budget_bytes)} budget "
            "can be freed: the rest is held by models with running or queued generations"
        )
    if count >= models_max:
        return LoadPlan(
            refusal=f"{count} models are loaded (--models-max {models_max}) and none is idle"
        )
    return LoadPlan(evict=tuple(evict))


def read_header(path: Path) -> GgufHeader:
    """The memory-relevant fields of a GGUF file's header (InvalidArgument/NOT_GGUF
    if it is not one)."""
    try:
        with path.open("rb", buffering=1 << 20) as f:
            return _parse(f, path.stat().st_size)
    except (
        struct.error,
        ValueError,
        UnicodeDecodeError,
        KeyError,
        OverflowError,
        TypeError,
    ) as exc:
        raise InvalidArgument(
            f"{path.name}: not a readable GGUF header ({exc})", reason=Reason.NOT_GGUF
        ) from exc


def _parse(f: BinaryIO, file_size: int) -> GgufHeader:
    if f.read(4) != GGUF_MAGIC:
        raise ValueError("no GGUF magic")
    (version,) = _unpack(f, "<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    n_tensors, n_kv = _unpack(f, "<QQ")
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
        raise ValueError(f"{n_kv} key/values, {n_tensors} tensors: too many")
    fields: dict[str, object] = {}
    for _ in range(n_kv):
        key = _string(f)
        (kind,) = _unpack(f, "<I")
        fields[key] = _value(f, GGUFValueType(kind))
    weights = parameters = 0
    for _ in range(n_tensors):
        _string(f)  # name
        (n_dims,) = _unpack(f, "<I")
        if n_dims > 8:
            raise ValueError(f"a tensor with {n_dims} dimensions")
        elements = 1
        for dim in _unpack(f, f"<{n_dims}Q"):
            elements *= dim
        kind, _offset = _unpack(f, "<IQ")
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        weights += elements // block * type_bytes
        parameters += elements
    if weights > file_size:
        raise ValueError("the tensors are larger than the file")
    arch = str(fields.get("general.architecture", ""))
    if not arch:
        raise ValueError("no general.architecture")

    def number(name: str, default: int | None = None) -> int:
        value = fields.get(f"{arch}.{name}", default)
        if value is None:
            raise KeyError(f"{arch}.{name}")
        if isinstance(value, list):  # per layer
            value = max(value, default=0)
        return int(value)  # type: ignore[arg-type]

    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    head_dim = n_embd // max(n_head, 1)
    vocab = fields.get("tokenizer.ggml.tokens")
    n_vocab = number("vocab_size", vocab if isinstance(vocab, int) else 0)
    return GgufHeader(
        architecture=arch,
        n_layer=number("block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=number("attention.head_count_kv", n_head),
        head_dim_k=number("attention.key_length", head_dim),
        head_dim_v=number("attention.value_length", head_dim),
        n_vocab=n_vocab,
        trained_context=number("context_length", 0),
        weights_bytes=weights,
        parameters=parameters,
        file_type=_file_type(fields.get("general.file_type")),
    )


def _file_type(value: object) -> str:
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _unpack(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the header ends early")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (length,) = _unpack(f, "<Q")
    if length > MAX_STRING:
        raise ValueError(f"a {length}-byte string")
    data = f.read(length)
    if len(data) != length:
        raise ValueError("the header ends early")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: GGUFValueType) -> object:
    """A scalar or string; for an array of strings, its length (the strings
    are skipped); for an array of numbers, the list."""
    if kind == GGUFValueType.STRING:
        return _string(f)
    if kind != GGUFValueType.ARRAY:
        return _unpack(f, _SCALARS[kind])[0]
    item_kind, count = _unpack(f, "<IQ")
    item_kind = GGUFValueType(item_kind)
    if count > MAX_ARRAY:
        raise ValueError(f"an array of {count} items")
    if item_kind == GGUFValueType.STRING:
        for _ in range(count):
            (length,) = _unpack(f, "<Q")
            if length > MAX_STRING:
                raise ValueError(f"a {length}-byte string")
            f.seek(length, 1)
        return count
    if item_kind == GGUFValueType.ARRAY:
        raise ValueError("nested arrays")
    fmt = _SCALARS[item_kind]
    size = struct.calcsize(fmt)
    if count > 4096:  # scores, token types: not needed, skipped
        f.seek(size * count, 1)
        return count
    return [v[0] for v in struct.iter_unpack(fmt, f.read(size * count))]
