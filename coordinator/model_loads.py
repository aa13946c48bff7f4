"""Models on demand: load a model that no ready node serves on the best node that can hold it.

Nodes report, on every heartbeat, the catalog models they could load
(``Capacity.stored_models``: cached in their model store, or fetchable) and the
memory they have for more models. When placement finds no ready node with a
requested model loaded, and some ready node can load it, the router asks
``ModelLoads`` to load it (``NodeService.LoadModel``) and then places the
request as usual. The choice is pure functions over the fleet snapshot, tested
table-driven:

- ``load_candidates``: ready nodes that can load the model and do not serve it;
- ``load_order``: those with room for it first, file cached first, then the
  most memory available (in coarse steps, so that nodes sharing a host compare
  equal), then the fewest generations running, then the node id; after them
  the nodes without room by their free memory (a node may make room by
  unloading idle models; it refuses with MODEL_TOO_BIG otherwise);
- ``no_room_error``: why no node can hold it (needed vs largest free).

``ModelLoads`` is the one use case with I/O: one load in flight per model on
this replica (concurrent requests for the model wait for the same load), a
node that refuses (too big, load failed, unreachable) is skipped for the next
one and left alone for a while, and every load is a span in the trace and
counted in the replica's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from edgefleet import telemetry
from edgefleet.catalog import looks_like_path
from edgefleet.errors import EdgefleetError, Reason, error_of, reason_of
from edgefleet.v1 import common_pb2, models_pb2, node_pb2

if TYPE_CHECKING:
    from coordinator.model_registry import ModelRegistry

log = logging.getLogger(__name__)

# Memory a load takes besides the file, when the node gives no estimate:
# weights plus a quarter (KV cache, compute buffers) plus a fixed margin.
FILE_OVERHEAD = 1.25
FIXED_OVERHEAD_BYTES = 64 << 20
# Memory is compared in steps of this size: below it, load decides.
MEMORY_STEP_BYTES = 512 << 20
# A node's refusal for lack of memory (declared by the node side; older builds lack it).
TOO_BIG = Reason.parse("MODEL_TOO_BIG") or Reason.MODEL_LOAD_FAILED
# How long LoadModel may take: the load, plus the file's transfer at no less
# than FETCH_BYTES_PER_S when the node has to fetch it first.
LOAD_TIMEOUT_S = 300.0
FETCH_BYTES_PER_S = 5e6
# A node that refused a model is not asked for it again for this long.
REFUSED_S = 60.0
# After a load, requests go to that node until the fleet view shows the model there.
FRESH_S = 15.0


# --- what the choice reads ---------------------------------------------------------------
class NodeEntryView(Protocol):
    @property
    def node_id(self) -> str: ...

    record: object  # a NodeStatus: .capacity (stored_models, models, memory, ...)


class FleetSnapshot(Protocol):
    nodes: Mapping[str, NodeEntryView]

    def is_ready(self, entry) -> bool: ...

    def pending(self, node_id: str) -> int: ...


@dataclass(frozen=True)
class LoadCandidate:
    node_id: str
    cached: bool  # the file is in the node's store
    memory_available: int  # bytes the node has for models
    memory_needed: int  # bytes the model is expected to take
    busy: int  # generations running and queued on the node

    @property
    def fits(self) -> bool:
        return self.memory_needed <= self.memory_available


def file_memory_needed(size_bytes: int) -> int:
    """What loading a file of ``size_bytes`` takes when no node has estimated it."""
    return int(size_bytes * FILE_OVERHEAD) + FIXED_OVERHEAD_BYTES


def memory_needed(stored: common_pb2.StoredModel) -> int:
    """The node's estimate, else the file's size plus the usual overhead."""
    if stored.memory_estimate_bytes:
        return stored.memory_estimate_bytes
    return file_memory_needed(stored.size_bytes)


def candidate(
    node_id: str,
    capacity: common_pb2.Capacity,
    model: str,
    pending: int = 0,
    registered: common_pb2.ModelFile | None = None,
) -> LoadCandidate | None:
    """The node as a place to load ``model``; None when it cannot load it or
    already has it loaded. ``registered``: the model's (smallest) file in the
    fleet registry, which any node can fetch from a coordinator."""
    if any(m.alias == model for m in capacity.models):
        return None
    stored = next((s for s in capacity.stored_models if s.alias == model), None)
    if stored is None and registered is None:
        return None
    if stored is None:
        stored = common_pb2.StoredModel(alias=model, size_bytes=registered.size_bytes)
    busy = sum(m.slots_total - m.slots_free + m.queue_depth for m in capacity.models)
    return LoadCandidate(
        node_id=node_id,
        cached=stored.cached,
        memory_available=capacity.model_memory_available_bytes,
        memory_needed=memory_needed(stored),
        busy=max(0, busy + pending),
    )


def load_candidates(
    fleet: FleetSnapshot,
    model: str,
    exclude: Iterable[str] = (),
    registered: common_pb2.ModelFile | None = None,
) -> list[LoadCandidate]:
    """Ready nodes, not excluded, that could load ``model`` and do not serve it."""
    excluded = set(exclude)
    found = []
    for entry in list(fleet.nodes.values()):
        if entry.node_id in excluded or not fleet.is_ready(entry):
            continue
        found_one = candidate(
            entry.node_id,
            entry.record.capacity,
            model,
            fleet.pending(entry.node_id),
            registered,
        )
        if found_one is not None:
            found.append(found_one)
    return found


def loadable(fleet: FleetSnapshot, model: str, *, registered: bool = False) -> bool:
    """Some ready node reports ``model`` among the models it could load, or
    ``model`` is in the fleet registry (``registered``) and some node is ready."""
    if not model.strip():
        return False
    if registered:
        return any_ready(fleet)
    return any(
        fleet.is_ready(entry) and any(s.alias == model for s in entry.record.capacity.stored_models)
        for entry in list(fleet.nodes.values())
    )


def any_ready(fleet: FleetSnapshot) -> bool:
    return any(fleet.is_ready(entry) for entry in list(fleet.nodes.values()))


def loadable_models(fleet: FleetSnapshot) -> set[str]:
    """Every model some ready node could load."""
    return {
        s.alias
        for entry in list(fleet.nodes.values())
        if fleet.is_ready(entry)
        for s in entry.record.capacity.stored_models
    }


MAX_PEERS = 3
SITE_LABEL = "site"


def peers_for(fleet: FleetSnapshot, model: str, node_id: str) -> list[node_pb2.ModelPeer]:
    """Ready nodes other than ``node_id`` that hold ``model``'s file (cached or
    loaded), on the same site (label ``site``) first: where ``node_id`` fetches
    it before asking a coordinator. The node checks the sha256 whoever sends."""
    target = fleet.nodes.get(node_id)
    site = target.record.labels.get(SITE_LABEL, "") if target is not None else ""
    found = []
    for entry in list(fleet.nodes.values()):
        if entry.node_id == node_id or not fleet.is_ready(entry):
            continue
        capacity = entry.record.capacity
        holds = any(m.alias == model for m in capacity.models) or any(
            s.alias == model and s.cached for s in capacity.stored_models
        )
        if holds:
            same_site = bool(site) and entry.record.labels.get(SITE_LABEL, "") == site
            found.append((not same_site, entry.node_id, entry.record.address))
    return [node_pb2.ModelPeer(node_id=n, address=a) for _, n, a in sorted(found)[:MAX_PEERS]]


def load_order(found: Iterable[LoadCandidate]) -> list[LoadCandidate]:
    """The nodes to ask, best first: those with room for the model, file cached
    first, then most memory available (in MEMORY_STEP_BYTES steps), then the
    least busy, then by id (a stable order); then those without room, most
    memory first (they may unload idle models to make room, or refuse)."""
    return sorted(
        found,
        key=lambda c: (
            not c.fits,
            not c.cached,
            -(c.memory_available // MEMORY_STEP_BYTES),
            c.busy,
            c.node_id,
        ),
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def no_room_error(model: str, found: list[LoadCandidate]) -> EdgefleetError:
    """Why no node can load ``model``: none can load it, or none has the memory."""
    if not found:
        return error_of(
            Reason.UNKNOWN_MODEL,
            f"no ready node serves model {model!r} or can load it",
        )
    needed = min(c.memory_needed for c in found)
    largest = max(c.memory_available for c in found)
    return error_of(
        TOO_BIG,
        f"no node has the memory for model {model!r}: it needs about {_mib(needed)}, "
        f"the largest free on a node that could load it is {_mib(largest)}",
    )


@dataclass(frozen=True)
class LoadWait:
    """What one request waited for: the model loaded on ``node_id``."""

    node_id: str
    waited_ms: float
    shared: bool  # it joined a load another request had started


class LoadNote:
    """Filled in by the generation path when the request waited for a load
    (an HTTP handler reads it for its response header)."""

    def __init__(self) -> None:
        self.wait: LoadWait | None = None


# --- the use case -----------------------------------------------------------------------
class ModelLoads:
    """Loads on demand for this replica; one load in flight per model."""

    def __init__(
        self,
        fleet,
        channels,
        *,
        metrics=None,
        timeout_s: float = LOAD_TIMEOUT_S,
        registry: ModelRegistry | None = None,
    ) -> None:
        self._fleet = fleet
        self._registry = registry
        self._channels = channels
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._inflight: dict[str, asyncio.Task[str]] = {}
        self._refused: dict[tuple[str, str], float] = {}  # (model, node) -> monotonic until
        self._fresh: dict[str, tuple[str, float]] = {}  # model -> (node, wall time loaded)
        self._last_error: dict[str, EdgefleetError] = {}  # why the last load of a model failed

    def _registered(self, model: str) -> models_pb2.RegisteredModel | None:
        """An operator's model from the registry (catalog models: None; nodes report those)."""
        record = self._registry.get(model) if self._registry is not None else None
        return record if record is not None and not record.builtin else None

    def _unregistered_fleet_model(self, model: str) -> bool:
        """A name that is neither a catalog alias nor in the registry (removed):
        nodes may still hold its file, but no one may load it any more."""
        return (
            self._registry is not None
            and self._registry.get(model) is None
            and not looks_like_path(model)
        )

    def loadable(self, model: str) -> bool:
        if self._unregistered_fleet_model(model):
            return False
        return loadable(self._fleet, model, registered=self._registered(model) is not None)

    def loadable_models(self) -> set[str]:
        """Every model a ready node could load, the registry's included."""
        found = {m for m in loadable_models(self._fleet) if not self._unregistered_fleet_model(m)}
        if self._registry is not None and any_ready(self._fleet):
            found |= {record.alias for record in self._registry.added()}
        return found

    def tagged(self, tasks) -> dict[str, list[str]]:
        """For each of ``tasks``: the registry's models tagged with it that a
        ready node serves or could load."""
        if self._registry is None:
            return {}
        servable = set(self._fleet.models()) | self.loadable_models()
        return {
            task: [
                r.alias for r in self._registry.added() if task in r.tasks and r.alias in servable
            ]
            for task in tasks
        }

    def _source(self, model: str, capacity: common_pb2.Capacity) -> common_pb2.ModelFile | None:
        """The file the node should load (its variant by the node's memory and GPU)."""
        if self._registry is None:
            return None
        return self._registry.source_for(model, capacity)

    def fresh_node(self, model: str) -> str:
        """The node this replica just loaded ``model`` on, while the fleet view
        does not show it yet; "" when none, or once the node's record was
        rewritten since (the view is current), or it left or is not ready."""
        fresh = self._fresh.get(model)
        if fresh is None:
            return ""
        node_id, at = fresh
        entry = self._fleet.nodes.get(node_id)
        if (
            time.time() - at > FRESH_S
            or entry is None
            or entry.record.heartbeat_at > at
            or not self._fleet.is_ready(entry)
        ):
            del self._fresh[model]
            return ""
        return node_id

    async def ensure(self, model: str, *, parent: Context | None = None) -> LoadWait:
        """Load ``model`` on the best node (or join the load in flight); the
        node it is loaded on. Raises EdgefleetError when no node could load it."""
        started = time.perf_counter()
        task = self._inflight.get(model)
        shared = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(model, parent))
            self._inflight[model] = task
            task.add_done_callback(lambda t: self._done(model, t))
        self._count("waits", model, "shared" if shared else "started")
        # Shielded: a request that leaves does not cancel the load others wait for.
        node_id = await asyncio.shield(task)
        return LoadWait(node_id, (time.perf_counter() - started) * 1e3, shared)

    def _done(self, model: str, task: asyncio.Task) -> None:
        if self._inflight.get(model) is task:
            del self._inflight[model]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have left

    def _refused_now(self, model: str) -> set[str]:
        now = time.monotonic()
        for key in [k for k, until in self._refused.items() if until <= now]:
            del self._refused[key]
        return {node for (m, node) in self._refused if m == model}

    async def _load(self, model: str, parent: Context | None) -> str:
        with telemetry.tracer().start_as_current_span(
            "model_load",
            context=parent,
            kind=trace.SpanKind.CLIENT,
            attributes={"gen_ai.request.model": model},
        ) as span:
            registered = self._registered(model)
            smallest = (
                min(registered.variants, key=lambda v: v.size_bytes)
                if registered is not None and registered.variants
                else None
            )
            found = load_candidates(
                self._fleet, model, exclude=self._refused_now(model), registered=smallest
            )
            order = load_order(found)
            if span.is_recording():
                span.set_attribute(
                    "edgefleet.model_load.candidates",
                    [f"{c.node_id}:{'cached' if c.cached else 'fetch'}" for c in order],
                )
            if not order:
                error = no_room_error(model, found)  # UNKNOWN_MODEL: no node can load it
                if self._refused_now(model):
                    last = self._last_error.get(model)
                    error = error_of(
                        last.reason if last else Reason.MODEL_LOAD_FAILED,
                        f"every node that could load model {model!r} refused it in the last "
                        f"{REFUSED_S:.0f}s" + (f": {last.message}" if last else ""),
                    )
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                self._count("loads", model, "none")
                raise error
            refusals, too_big = [], 0
            for chosen in order:
                entry = self._fleet.nodes.get(chosen.node_id)
                if entry is None:
                    continue
                started = time.perf_counter()
                source = self._source(model, entry.record.capacity)
                timeout = self._timeout_s
                if not chosen.cached and source is not None:
                    timeout += source.size_bytes / FETCH_BYTES_PER_S
                try:
                    await self._channels.stub(entry.record.address, chosen.node_id).LoadModel(
                        node_pb2.LoadModelRequest(
                            model=model,
                            source=source,
                            peers=peers_for(self._fleet, model, chosen.node_id),
                        ),
                        timeout=timeout,
                        metadata=telemetry.outgoing_metadata(span),
                    )
                    outcome = "loaded"
                except grpc.RpcError as error:
                    reason = reason_of(error)
                    outcome = "already_loaded"  # loaded meanwhile (another replica): use it
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason is None:
                        # Still fetching or loading there (it goes on): asking the
                        # next node would start the same long transfer again.
                        self._count("loads", model, "slow")
                        error = error_of(
                            Reason.NO_READY_NODE,
                            f"model {model!r} is still loading on node {chosen.node_id} after "
                            f"{timeout:.0f}s; retry later",
                            retry_after_s=30.0,
                        )
                        span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                        raise error from None
                    if reason is not Reason.MODEL_LOADED:
                        too_big += reason is TOO_BIG
                        refusals.append(
                            f"{chosen.node_id}: {reason.name if reason else error.code().name}: "
                            f"{error.details()}"
                        )
                        self._refused[(model, chosen.node_id)] = time.monotonic() + REFUSED_S
                        self._count("loads", model, "refused")
                        span.add_event(
                            "refused",
                            {"edgefleet.node.id": chosen.node_id, "edgefleet.error": refusals[-1]},
                        )
                        log.warning("node refused to load %s: %s", model, refusals[-1])
                        continue
                seconds = time.perf_counter() - started
                self._fresh[model] = (chosen.node_id, time.time())
                self._last_error.pop(model, None)
                self._count("loads", model, outcome)
                if self._metrics is not None:
                    self._metrics.model_load_duration.labels(model).observe(seconds)
                span.set_attributes(
                    {
                        "edgefleet.node.id": chosen.node_id,
                        "edgefleet.model_load.cached": chosen.cached,
                        "edgefleet.model_load.ms": seconds * 1e3,
                    }
                )
                log.info("loaded %s on demand on node %s in %.1fs", model, chosen.node_id, seconds)
                return chosen.node_id
            if refusals and too_big == len(refusals):
                no_room = no_room_error(model, found)
                error = error_of(no_room.reason, f"{no_room.message} ({'; '.join(refusals)})")
                self._count("loads", model, "no_room")
            else:
                error = error_of(
                    Reason.MODEL_LOAD_FAILED,
                    f"no node could load {model!r}: " + "; ".join(refusals or ["none left"]),
                )
            self._last_error[model] = error
            span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
            raise error

    def _count(self, kind: str, model: str, outcome: str) -> None:
        if self._metrics is None:
            return
        counter = self._metrics.model_loads if kind == "loads" else self._metrics.model_load_waits
        counter.labels(model, outcome).inc()
