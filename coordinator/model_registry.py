"""The fleet's model registry: which models the fleet has, and their files.

etcd holds one ``RegisteredModel`` per alias (``<prefix>models/<alias>``),
with its variants (one GGUF file each: sha256, size, and what its header
says); every replica mirrors the prefix. The files themselves live on the
coordinator's disk, named by their sha256 (``<model dir>/<sha256>.gguf``), so
one file added under two aliases is stored once. Nodes fetch them with
``ModelService.FetchModel`` (from any replica that holds the file; a replica
without it answers MODEL_NOT_CACHED and the node asks the next).

Catalog aliases are built in: listed with ``builtin``, their files served from
this machine's model store when cached there (``edgefleet models pull``), so
an offline device gets them from the coordinator instead of a package index.

Upload rules (``add``): a header first (alias, variant, size, optional
sha256), then the bytes; written to a ``.partial`` file and hashed as they
come, refused when the disk lacks room (DISK_FULL), when the bytes end early
or run past the size (UPLOAD_INCOMPLETE), when the sha256 differs
(MODEL_FILE_BAD) or the file is not GGUF (NOT_GGUF); nothing half-written is
left behind and the registry changes only after the file is in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.etcd import Compare, Delete, Etcd, KeyedRecords, Put
from coordinator.keys import Keys
from coordinator.model_loads import file_memory_needed
from edgefleet.catalog import CATALOG, CatalogEntry
from edgefleet.errors import EdgefleetError, Reason, error_of
from edgefleet.model_memory import read_header
from edgefleet.model_store import ModelStore, write_hashed
from edgefleet.v1 import common_pb2, models_pb2

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per FetchModel message (and the most per AddModel message)
# Free disk left after an upload, so that the coordinator's own files still fit.
DISK_MARGIN_BYTES = 256 << 20
MAX_MODEL_BYTES = 256 << 30
ALIAS = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VARIANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
TASK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_TASKS = 16
MAX_DESCRIPTION = 512
SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --- pure rules ---------------------------------------------------------------------------
def check_alias(alias: str) -> None:
    """INVALID_REQUEST for a name no model can have (before it names an etcd key)."""
    if not ALIAS.match(alias) and alias not in CATALOG:
        raise error_of(
            Reason.INVALID_REQUEST,
            f"model name {alias[:80]!r}: 1-64 lowercase letters, digits, '.', '_' or '-'",
        )


def check_header(header: models_pb2.AddModelHeader) -> None:
    """Refuse a malformed upload header (INVALID_REQUEST) before any byte is written."""

    def bad(message: str) -> EdgefleetError:
        return error_of(Reason.INVALID_REQUEST, message)

    if not ALIAS.match(header.alias):
        raise bad(
            "alias: 1-64 characters, lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if header.alias in CATALOG:
        raise bad(f"{header.alias!r} is a built-in catalog alias; choose another name")
    if header.variant and not VARIANT.match(header.variant):
        raise bad("variant: 1-32 characters, lowercase letters, digits, '.', '_' or '-'")
    if len(header.tasks) > MAX_TASKS or not all(TASK.match(t) for t in header.tasks):
        raise bad(f"tasks: at most {MAX_TASKS}, each 1-32 lowercase letters, digits, '_', '-'")
    if len(header.description) > MAX_DESCRIPTION:
        raise bad(f"description: at most {MAX_DESCRIPTION} characters")
    if not 0 < header.size_bytes <= MAX_MODEL_BYTES:
        raise bad(f"size_bytes: between 1 and {MAX_MODEL_BYTES} bytes")
    if header.sha256 and not SHA256.match(header.sha256):
        raise bad("sha256: 64 lowercase hex digits")
    if len(header.file_name) > 255 or "/" in header.file_name or "\0" in header.file_name:
        raise bad("file_name: a plain file name of at most 255 characters")


def catalog_file(entry: CatalogEntry) -> common_pb2.ModelFile:
    return common_pb2.ModelFile(
        variant=entry.quantization.lower(),
        file_name=entry.file_name,
        sha256=entry.sha256,
        size_bytes=entry.size_bytes,
        trained_context=entry.trained_context,
        quantization=entry.quantization,
    )


def builtin(entry: CatalogEntry) -> models_pb2.RegisteredModel:
    return models_pb2.RegisteredModel(
        alias=entry.alias,
        description=entry.description,
        variants=[catalog_file(entry)],
        builtin=True,
    )


def with_variant(
    current: models_pb2.RegisteredModel | None,
    header: models_pb2.AddModelHeader,
    file: common_pb2.ModelFile,
) -> models_pb2.RegisteredModel:
    """The alias's record with ``file`` added (replacing a variant of its name)."""
    record = models_pb2.RegisteredModel()
    if current is not None:
        record.CopyFrom(current)
    record.alias = header.alias
    if header.description:
        record.description = header.description
    if header.tasks:
        del record.tasks[:]
        record.tasks.extend(dict.fromkeys(header.tasks))
    kept = [v for v in record.variants if v.variant != file.variant]
    del record.variants[:]
    record.variants.extend([*kept, file])
    record.added_at = time.time()
    return record


MAX_ARCHITECTURE = 128


def model_file(
    header: models_pb2.AddModelHeader, sha256: str, size: int, found
) -> common_pb2.ModelFile:
    """The registry's record of an uploaded file, from what its GGUF header
    says; NOT_GGUF when the header's values cannot be a model's."""
    quantization = found.file_type or "unknown"
    if (
        not 0 <= found.trained_context < 2**32
        or not 0 <= found.parameters < 2**64
        or len(found.architecture) > MAX_ARCHITECTURE
    ):
        raise error_of(Reason.NOT_GGUF, "the GGUF header's values are out of range for a model")
    return common_pb2.ModelFile(
        variant=header.variant or quantization.lower(),
        file_name=header.file_name or f"{header.alias}.gguf",
        sha256=sha256,
        size_bytes=size,
        architecture=found.architecture,
        parameters=found.parameters,
        trained_context=found.trained_context,
        quantization=quantization,
    )


# What this registry writes in its folder: <sha256>.gguf, and a cut copy's .partial.
STORED_FILE = re.compile(r"([0-9a-f]{64})\.gguf(?:\.partial)?")


@dataclass(frozen=True)
class VariantFacts:
    """What a node's variant is chosen by (read from its capacity report)."""

    # What the node reports free for more models: its budget left, capped by
    # free memory where its models live (the GPU's with every layer there).
    memory_available: int
    gpu_layers: int = 0  # layers its loads place on a GPU (-1: all)
    gpu_memory_free: int | None = None  # its GPU's free memory; None: no GPU read

    @property
    def all_on_gpu(self) -> bool:
        return self.gpu_layers < 0 and self.gpu_memory_free is not None


def variant_facts(capacity: common_pb2.Capacity | None) -> VariantFacts:
    if capacity is None:
        return VariantFacts(memory_available=0)
    # The GPU with the most free: llama.cpp may split layers over several, but
    # NVML also lists GPUs that CUDA_VISIBLE_DEVICES hides from the node.
    free = max(
        (max(0, g.memory_total_bytes - g.memory_used_bytes) for g in capacity.gpus), default=None
    )
    return VariantFacts(capacity.model_memory_available_bytes, capacity.gpu_layers, free)


def choose_variant(
    variants: list[common_pb2.ModelFile], node: VariantFacts
) -> common_pb2.ModelFile | None:
    """The variant a node should get: the largest file (the best quality) that
    fits the memory it has, else the smallest (the node may make room). A node
    that puts every layer on a GPU holds weights and KV cache there: its GPU's
    free memory counts; with some layers or none there, its host memory."""
    if not variants:
        return None
    # The node's own budget (what it reports free for models) bounds both.
    room = (
        min(node.gpu_memory_free, node.memory_available)
        if node.all_on_gpu
        else node.memory_available
    )
    fitting = [v for v in variants if file_memory_needed(v.size_bytes) <= room]
    if fitting:
        return max(fitting, key=lambda v: (v.size_bytes, v.variant))
    return min(variants, key=lambda v: (v.size_bytes, v.variant))


# --- the use case -----------------------------------------------------------------------
@dataclass
class Upload:
    """A file being received: written and hashed chunk by chunk, off the loop."""

    path: Path
    expected: int
    received: int = 0

    def __post_init__(self) -> None:
        self._digest = hashlib.sha256()
        self._file = self.path.open("wb")

    def write(self, data: bytes) -> None:
        write_hashed(self._file, self._digest, data, "the coordinator's disk")

    def close(self) -> str:
        self._file.close()
        return self._digest.hexdigest()


class ModelRegistry:
    def __init__(self, etcd: Etcd, keys: Keys, files_dir: Path, store: ModelStore) -> None:
        self._etcd = etcd
        self._keys = keys
        self.files_dir = files_dir
        self._store = store
        self._records = KeyedRecords(models_pb2.RegisteredModel.FromString, what="model record")
        self._models = self._records.items
        self.synced = asyncio.Event()
        # Held over "place a file + write its record" and over "read which
        # files records name + delete the others": no deletion falls between.
        self._files_lock = asyncio.Lock()

    # --- mirroring etcd --------------------------------------------------------------
    async def run(self) -> None:
        await self._etcd.mirror({self._keys.models: self._records.handlers}, self.synced)

    # --- reading -------------------------------------------------------------------------
    def get(self, alias: str) -> models_pb2.RegisteredModel | None:
        entry = CATALOG.get(alias)
        if entry is not None:
            return builtin(entry)
        return self._models.get(alias)

    def added(self) -> list[models_pb2.RegisteredModel]:
        """The models operators added (not the catalog's)."""
        return [self._models[alias] for alias in sorted(self._models)]

    def all(self) -> list[models_pb2.RegisteredModel]:
        return [builtin(CATALOG[alias]) for alias in sorted(CATALOG)] + self.added()

    def source_for(
        self, alias: str, capacity: common_pb2.Capacity | None = None
    ) -> common_pb2.ModelFile | None:
        """The file the node that reported ``capacity`` should load for ``alias``
        (None: not in the registry)."""
        record = self.get(alias)
        if record is None:
            return None
        return choose_variant(list(record.variants), variant_facts(capacity))

    def file_path(self, alias: str, sha256: str) -> Path | None:
        """This replica's copy of ``alias``'s file with ``sha256``, if it has one."""
        record = self.get(alias)
        if record is None or not any(v.sha256 == sha256 for v in record.variants):
            return None
        entry = CATALOG.get(alias)
        path = self._store.path_of(entry) if entry else self.stored_path(sha256)
        return path if path.is_file() else None

    def stored_path(self, sha256: str) -> Path:
        """Where this replica keeps an added model's file (``STORED_FILE``)."""
        return self.files_dir / f"{sha256}.gguf"

    def missing_files(self) -> list[tuple[str, common_pb2.ModelFile]]:
        """Added models' files this replica has no copy of: (alias, file)."""
        found: dict[str, tuple[str, common_pb2.ModelFile]] = {}
        for record in self.added():
            for variant in record.variants:
                if not self.stored_path(variant.sha256).is_file():
                    found.setdefault(variant.sha256, (record.alias, variant))
        return list(found.values())

    async def drop_unreferenced(self) -> None:
        """Delete the files here (and cut fetches' partial files) that no
        record names: removed or replaced through another replica."""
        names = await asyncio.to_thread(
            lambda: (
                [p.name for p in self.files_dir.glob("*.gguf*")] if self.files_dir.is_dir() else []
            )
        )
        # Only files this registry names so (an operator's own "mistral.gguf"
        # in the folder is not ours to delete), and not those the mirror names.
        shas = {m.group(1) for name in names if (m := STORED_FILE.fullmatch(name))}
        named = {v.sha256 for record in self.added() for v in record.variants}
        await self._drop_unused(shas - named)

    # --- changing ------------------------------------------------------------------------
    async def add(
        self, header: models_pb2.AddModelHeader, chunks: AsyncIterator[bytes]
    ) -> models_pb2.RegisteredModel:
        check_header(header)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.files_dir).free
        if header.size_bytes + DISK_MARGIN_BYTES > free:
            raise error_of(
                Reason.DISK_FULL,
                f"the coordinator has {free >> 20} MiB free for a {header.size_bytes >> 20} MiB "
                "model file",
            )
        upload = Upload(self.files_dir / f".upload-{uuid.uuid4().hex}.partial", header.size_bytes)
        target = None
        try:
            sha256 = await self._receive(upload, chunks)
            if header.sha256 and sha256 != header.sha256:
                raise error_of(
                    Reason.MODEL_FILE_BAD,
                    f"the file's sha256 is {sha256}, the upload said {header.sha256}",
                )
            found = await asyncio.to_thread(read_header, upload.path)  # NOT_GGUF if it is not
            file = model_file(header, sha256, upload.received, found)  # NOT_GGUF if out of range
            target = self.stored_path(sha256)
            replaced: set[str] = set()

            def change(current):
                replaced.update(
                    v.sha256
                    for v in (current.variants if current else [])
                    if v.variant == file.variant
                )
                return with_variant(current, header, file)

            async with self._files_lock:
                existed = target.exists()
                os.replace(upload.path, target)
                try:
                    record = await self._update(header.alias, change)
                except BaseException:
                    if not existed:  # placed but not recorded
                        await asyncio.to_thread(target.unlink, missing_ok=True)
                    raise
        finally:
            await asyncio.to_thread(upload.path.unlink, missing_ok=True)
        await self._drop_unused(replaced - {sha256})
        log.info(
            "model %s variant %s added: %s, %d MiB, sha256 %s",
            header.alias,
            file.variant,
            found.architecture,
            file.size_bytes >> 20,
            sha256[:12],
        )
        return record

    async def _receive(self, upload: Upload, chunks: AsyncIterator[bytes]) -> str:
        try:
            async for data in chunks:
                if len(data) > CHUNK:
                    raise error_of(
                        Reason.INVALID_REQUEST, f"an upload message holds at most {CHUNK} bytes"
                    )
                upload.received += len(data)
                if upload.received > upload.expected:
                    raise error_of(
                        Reason.UPLOAD_INCOMPLETE,
                        f"the upload went past the {upload.expected} bytes its header gave",
                    )
                await asyncio.to_thread(upload.write, data)
        finally:
            sha256 = await asyncio.to_thread(upload.close)
        if upload.received != upload.expected:
            raise error_of(
                Reason.UPLOAD_INCOMPLETE,
                f"the upload ended after {upload.received} of {upload.expected} bytes",
            )
        return sha256

    async def _update(self, alias: str, change) -> models_pb2.RegisteredModel:
        """Read-modify-write the alias's record, retried when another replica wrote it."""
        key = self._keys.model(alias)
        for _ in range(8):
            kv = await self._etcd.get(key)
            current = models_pb2.RegisteredModel.FromString(kv.value) if kv else None
            record = change(current)
            guard = Compare(key, mod_revision=kv.mod_revision if kv else 0)
            write = Delete(key) if record is None else Put(key, record.SerializeToString())
            ok, _ = await self._etcd.txn([guard], [write])
            if ok:
                return record if record is not None else current
        raise error_of(Reason.ACCESS_CONFLICT, f"model {alias!r} kept changing; try again")

    async def remove(self, alias: str, variant: str = "", *, deployed: bool = False) -> None:
        check_alias(alias)
        if deployed:
            raise error_of(
                Reason.MODEL_DEPLOYED,
                f"{alias!r} is deployed; undeploy it first (edgefleet models undeploy {alias})",
            )
        if alias in CATALOG:
            raise error_of(Reason.INVALID_REQUEST, f"{alias!r} is built in; it cannot be removed")
        if alias not in self._models and await self._etcd.get(self._keys.model(alias)) is None:
            raise error_of(Reason.UNKNOWN_MODEL, f"no model {alias!r} in the registry")

        def change(current):
            if current is None:
                raise error_of(Reason.UNKNOWN_MODEL, f"no model {alias!r} in the registry")
            if not variant:
                return None
            kept = [v for v in current.variants if v.variant != variant]
            if len(kept) == len(current.variants):
                raise error_of(Reason.UNKNOWN_MODEL, f"{alias!r} has no variant {variant!r}")
            record = models_pb2.RegisteredModel()
            record.CopyFrom(current)
            del record.variants[:]
            record.variants.extend(kept)
            return record if kept else None

        dropped: set[str] = set()

        def recorded(current):
            for v in current.variants if current else []:
                if not variant or v.variant == variant:
                    dropped.add(v.sha256)
            return change(current)

        await self._update(alias, recorded)
        await self._drop_unused(dropped)
        log.info("model %s%s removed", alias, f" variant {variant}" if variant else "")

    async def _drop_unused(self, candidates: set[str]) -> None:
        """Delete this replica's files among ``candidates`` that no record names,
        as etcd says now (not the mirror, which may lag a concurrent add)."""
        if not candidates:
            return
        async with self._files_lock:
            await self._drop_unused_locked(candidates)

    async def _drop_unused_locked(self, candidates: set[str]) -> None:
        used = set()
        listed, _ = await self._etcd.get_prefix(self._keys.models)
        for kv in listed:
            try:
                used.update(
                    v.sha256 for v in models_pb2.RegisteredModel.FromString(kv.value).variants
                )
            except Exception:
                continue
        for sha in candidates - used:
            stored = self.stored_path(sha)
            for path in (stored, stored.with_name(stored.name + ".partial")):
                if path.exists():
                    log.info("deleting %s: no model in the registry names it", path.name)
                    await asyncio.to_thread(path.unlink, missing_ok=True)
