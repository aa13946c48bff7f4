"""How much of etcd one node may use: its record's size and its rewrite rate.

Pure rules, used by ``coordinator.membership``:

- **Size.** What a node reports is trimmed to fixed bounds (models, GPUs, the
  length of each text field) before it is stored, and a registration whose
  record would still be over ``MAX_RECORD_BYTES`` (long labels, a long model
  list) is refused with ``NODE_RECORD_TOO_LARGE``.
- **Rate.** A heartbeat refreshes the node's lease and rewrites its record
  only when due: a change placement reads is written at once, but never more
  often than every ``min_interval_s``; an unchanged record is rewritten every
  ``refresh_s`` (its heartbeat time). A node beating a thousand times a
  second costs etcd no more than one beating twice a second. Silence is
  judged per beat, as before: only the writes are paced.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.errors import EdgefleetError, Reason, error_of
from edgefleet.v1 import common_pb2, coordinator_pb2

MAX_MODELS = 32  # models in one report
MAX_GPUS = 16
MAX_TEXT_CHARS = 128  # alias, quantization, runtime, sha256, GPU name
MAX_PATH_CHARS = 512
MAX_RECORD_BYTES = 64 * 1024
MAX_ORIGINS = 64  # coordinators a node counts generations for


def trim_capacity(capacity: common_pb2.Capacity) -> None:
    """Cut a report (in place) to the bounds above: the first models (loaded
    and stored) and GPUs, each text field to its length."""
    if len(capacity.models) > MAX_MODELS:
        del capacity.models[MAX_MODELS:]
    if len(capacity.gpus) > MAX_GPUS:
        del capacity.gpus[MAX_GPUS:]
    # A model with a blank name is nothing anyone can ask for: dropped, so it
    # never makes "" look loadable.
    named = [m for m in capacity.stored_models if m.alias.strip()]
    if len(named) != len(capacity.stored_models):
        del capacity.stored_models[:]
        capacity.stored_models.extend(named)
    if len(capacity.stored_models) > MAX_MODELS:
        del capacity.stored_models[MAX_MODELS:]
    for stored in capacity.stored_models:
        stored.alias = stored.alias[:MAX_TEXT_CHARS]
    for model in capacity.models:
        model.alias = model.alias[:MAX_TEXT_CHARS]
        model.path = model.path[:MAX_PATH_CHARS]
        model.quantization = model.quantization[:MAX_TEXT_CHARS]
        model.runtime = model.runtime[:MAX_TEXT_CHARS]
        model.sha256 = model.sha256[:MAX_TEXT_CHARS]
    for gpu in capacity.gpus:
        gpu.name = gpu.name[:MAX_TEXT_CHARS]
    if len(capacity.fetches) > MAX_MODELS:
        del capacity.fetches[MAX_MODELS:]
    for fetch in capacity.fetches:
        fetch.alias = fetch.alias[:MAX_TEXT_CHARS]
    origins = capacity.active_by_origin
    if len(origins) > MAX_ORIGINS or any(len(o) > MAX_TEXT_CHARS for o in origins):
        # The busiest origins are kept: they matter most to placement.
        kept = sorted(
            ((o, n) for o, n in origins.items() if len(o) <= MAX_TEXT_CHARS),
            key=lambda item: (-item[1], item[0]),
        )[:MAX_ORIGINS]
        origins.clear()
        origins.update(dict(kept))


def record_too_large(record: coordinator_pb2.NodeStatus) -> EdgefleetError | None:
    """NODE_RECORD_TOO_LARGE if the record is over ``MAX_RECORD_BYTES``, else None."""
    size = record.ByteSize()
    if size <= MAX_RECORD_BYTES:
        return None
    return error_of(
        Reason.NODE_RECORD_TOO_LARGE,
        f"node {record.node_id!r}: its record would be {size} bytes, over the limit of "
        f"{MAX_RECORD_BYTES} bytes (at most {MAX_MODELS} models of {MAX_TEXT_CHARS}-character "
        "names; keep labels, version and model names short)",
    )


@dataclass
class RecordPacer:
    """When one node's heartbeat stream may write to etcd (one per stream)."""

    min_interval_s: float
    refresh_s: float
    written_signature: tuple | None = None
    written_at: float | None = None
    refreshed_at: float | None = None

    def record_due(self, signature: tuple, now: float) -> bool:
        """Rewrite the record now? A change after ``min_interval_s``, else every
        ``refresh_s``. A change held back is written by the first beat after
        the interval (it is compared with what was written, not the last beat)."""
        if self.written_at is None:
            return True
        since = now - self.written_at
        if since >= self.refresh_s:
            return True
        return signature != self.written_signature and since >= self.min_interval_s

    def lease_due(self, now: float) -> bool:
        """Refresh the lease now? At most every ``min_interval_s``."""
        return self.refreshed_at is None or now - self.refreshed_at >= self.min_interval_s

    def record_written(self, signature: tuple, now: float) -> None:
        self.written_signature, self.written_at = signature, now

    def lease_refreshed(self, now: float) -> None:
        self.refreshed_at = now
