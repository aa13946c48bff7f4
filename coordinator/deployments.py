"""Desired state for models: "keep ALIAS loaded on N matching nodes".

An operator's deployment is a record in etcd (``<prefix>deployments/<alias>``:
replicas, a label selector, a keep-alive), mirrored by every replica. The
replica that holds the maintenance leadership runs the reconciler: every few
seconds it compares each deployment with the fleet view and asks nodes to
load (fetching the file first when they lack it) or unload until the fleet
matches. The comparison is a pure function (``plan``), tested table-driven;
the loop only carries it out, one call per (node, model) at a time, and
remembers each node's refusal for a while so that a node that cannot hold
the model is not asked every round.

Deployed models are loaded with no keep-alive (never unloaded for being
idle) unless the deployment says otherwise; a model a node had loaded on
demand is adopted (its keep-alive becomes the deployment's). ``undeploy``
removes the record and unloads the model where it was loaded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from coordinator.etcd import Etcd, KeyedRecords
from coordinator.keys import Keys
from coordinator.model_loads import MEMORY_STEP_BYTES, peers_for
from coordinator.model_registry import check_alias
from edgefleet.errors import Reason, error_of, reason_of
from edgefleet.v1 import models_pb2, node_pb2

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 2.0
# A node that refused to load a deployed model is not asked again for this long.
REFUSED_S = 60.0
LOAD_TIMEOUT_S = 600.0  # a load may fetch the file first
MAX_REPLICAS = 10_000
MAX_SELECTOR = 16
FOREVER = -1.0


# --- the pure decision ----------------------------------------------------------------------
@dataclass(frozen=True)
class NodeFacts:
    node_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    loaded: bool = False  # has the model loaded
    loading: bool = False  # a load (or its file's fetch) is under way
    cached: bool = False  # has the file
    memory_available: int = 0
    busy: int = 0  # generations running or queued on the model here
    refused: bool = False  # refused it recently


@dataclass(frozen=True)
class DeployPlan:
    wanted: int
    load: tuple[str, ...] = ()
    unload: tuple[str, ...] = ()
    problem: str = ""


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def plan(deployment: models_pb2.Deployment, nodes: Sequence[NodeFacts]) -> DeployPlan:
    """What to do for ``deployment`` given the ready nodes: which nodes should
    load it (cached file first, then the most memory, the least busy, by id)
    and which should unload it (too many replicas: the least busy first).
    While no node has the file, one node loads it first (a seed) and the rest
    follow once it does, fetching it from that node."""
    eligible = [n for n in nodes if matches(deployment.selector, n.labels)]
    if not eligible:
        return DeployPlan(wanted=0, problem="the selector matches no ready node")
    wanted = len(eligible) if deployment.replicas <= 0 else min(deployment.replicas, len(eligible))
    holding = [n for n in eligible if n.loaded or n.loading]
    if len(holding) > wanted:
        extra = sorted(
            (n for n in holding if n.loaded and not n.loading),
            key=lambda n: (n.busy, n.node_id),
        )[: len(holding) - wanted]
        return DeployPlan(wanted=wanted, unload=tuple(n.node_id for n in extra))
    candidates = sorted(
        (n for n in eligible if not (n.loaded or n.loading) and not n.refused),
        key=lambda n: (not n.cached, -(n.memory_available // MEMORY_STEP_BYTES), n.busy, n.node_id),
    )
    short = wanted - len(holding)
    chosen = tuple(n.node_id for n in candidates[:short])
    if not any(n.cached or n.loaded for n in nodes):
        # No node has the file yet: one fetches it from the coordinator, the
        # others then fetch it from that node (peers) rather than all at once
        # from the coordinator.
        chosen = () if any(n.loading for n in nodes) else chosen[:1]
    problem = ""
    if len(chosen) < short and any(n.refused for n in eligible):
        problem = f"{short - len(chosen)} of {wanted} node(s) refused it recently"
    return DeployPlan(wanted=wanted, load=chosen, problem=problem)


def check(deployment: models_pb2.Deployment) -> None:
    check_alias(deployment.alias)
    if not math.isfinite(deployment.keep_alive_s):
        raise error_of(Reason.INVALID_REQUEST, "keep_alive_s: seconds, or < 0 for forever")
    if deployment.replicas < 0 or deployment.replicas > MAX_REPLICAS:
        raise error_of(Reason.INVALID_REQUEST, f"replicas: 0 (all) to {MAX_REPLICAS}")
    if len(deployment.selector) > MAX_SELECTOR or any(
        not k or len(k) > 64 or len(v) > 128 for k, v in deployment.selector.items()
    ):
        raise error_of(
            Reason.INVALID_REQUEST,
            f"selector: at most {MAX_SELECTOR} labels, keys of 1-64 and values of at most "
            "128 characters",
        )


# --- the use case -----------------------------------------------------------------------
class Deployments:
    def __init__(self, etcd: Etcd, keys: Keys, fleet, registry, channels, leadership) -> None:
        self._etcd = etcd
        self._keys = keys
        self._fleet = fleet
        self._registry = registry
        self._channels = channels
        self._leadership = leadership
        self._records = KeyedRecords(
            models_pb2.Deployment.FromString, what="deployment", changed=self._changed
        )
        self.wanted: dict[str, models_pb2.Deployment] = self._records.items
        self.synced = asyncio.Event()
        self._calls: dict[tuple[str, str], asyncio.Task] = {}  # (node, alias) -> load/unload
        self._refused: dict[tuple[str, str], tuple[float, str]] = {}  # -> (until, why)
        self._adopted: set[tuple[str, str]] = set()  # loaded here with the deployment's keep-alive
        # Unloaded for being idle under a finite keep-alive: not loaded back
        # there (it returns on demand) until the model is deployed again.
        self._idled: set[tuple[str, str]] = set()
        self.problems: dict[str, str] = {}

    # --- mirroring etcd --------------------------------------------------------------
    async def run_mirror(self) -> None:
        await self._etcd.mirror({self._keys.deployments: self._records.handlers}, self.synced)

    def _changed(self, alias, before, after) -> None:
        if after is None:  # undeployed
            self._forget_alias(alias, unload=True)
        elif before is not None and before.created_at != after.created_at:
            self._forget_alias(alias, unload=False)  # deployed again: adopt anew

    def _forget_alias(self, alias: str, *, unload: bool) -> None:
        """Drop what this replica did for ``alias``'s deployment: loads in
        flight are cancelled; with ``unload`` (undeployed), the leader unloads
        the model where it loaded or adopted it (a non-leader did none)."""
        for key, task in list(self._calls.items()):
            if key[1] == alias:
                task.cancel()
        adopted = [key for key in self._adopted if key[1] == alias]
        self._adopted -= set(adopted)
        self._idled = {key for key in self._idled if key[1] != alias}
        if unload and self._leadership.is_leader:
            for node_id, _ in adopted:
                self._start(node_id, alias, self._unload(node_id, alias), replace=True)

    # --- operator calls ---------------------------------------------------------------
    async def deploy(self, request: models_pb2.Deployment) -> models_pb2.Deployment:
        check(request)
        if self._registry.get(request.alias) is None:
            raise error_of(
                Reason.UNKNOWN_MODEL,
                f"no model {request.alias!r} in the registry (edgefleet models registry)",
            )
        if not plan(request, self._facts(request.alias)).wanted:
            raise error_of(
                Reason.NO_MATCHING_NODE,
                "the selector matches no ready node"
                + (f" ({dict(request.selector)})" if request.selector else ""),
            )
        deployment = models_pb2.Deployment()
        deployment.CopyFrom(request)
        deployment.keep_alive_s = request.keep_alive_s or FOREVER
        deployment.created_at = time.time()
        self._idled = {key for key in self._idled if key[1] != request.alias}
        await self._etcd.put(self._keys.deployment(request.alias), deployment.SerializeToString())
        self.wanted[request.alias] = deployment  # this replica's view at once
        log.info("deployed %s: %s", request.alias, _describe(deployment))
        return deployment

    async def undeploy(self, alias: str) -> None:
        check_alias(alias)
        if not await self._etcd.delete(self._keys.deployment(alias)):
            raise error_of(Reason.UNKNOWN_MODEL, f"{alias!r} is not deployed")
        if self.wanted.pop(alias, None) is not None:
            self._forget_alias(alias, unload=False)
        # Unloaded where loaded now (this replica's view); the leader's mirror
        # also cancels its loads in flight and unloads what it adopted.
        for facts in self._facts(alias):
            if facts.loaded:
                self._start(facts.node_id, alias, self._unload(facts.node_id, alias), replace=True)
        log.info("undeployed %s", alias)

    def placements(self) -> list[models_pb2.ModelPlacement]:
        """Every model deployed or loaded, with where it stands."""
        aliases = set(self.wanted)
        for entry in list(self._fleet.nodes.values()):
            aliases |= {m.alias for m in entry.record.capacity.models}
            aliases |= {f.alias for f in entry.record.capacity.fetches}
        found = []
        for alias in sorted(aliases):
            facts = self._facts(alias)
            placement = models_pb2.ModelPlacement(
                alias=alias,
                loaded_on=[f.node_id for f in facts if f.loaded],
                cached_on=[f.node_id for f in facts if f.cached and not f.loaded],
            )
            for entry in list(self._fleet.nodes.values()):
                for fetch in entry.record.capacity.fetches:
                    if fetch.alias == alias:
                        placement.fetching.add(
                            alias=entry.node_id,
                            bytes_done=fetch.bytes_done,
                            bytes_total=fetch.bytes_total,
                        )
            deployment = self.wanted.get(alias)
            if deployment is not None:
                placement.deployment.CopyFrom(deployment)
                decided = plan(deployment, facts)
                placement.wanted = decided.wanted
                placement.problem = decided.problem or self.problems.get(alias, "")
            found.append(placement)
        return found

    # --- the reconciler (the leader's loop) -------------------------------------------
    async def run_reconciler(self, interval_s: float = RECONCILE_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self._leadership.is_leader and self._all_synced():
                self.reconcile()

    def _all_synced(self) -> bool:
        """Plans read the fleet and the registry too: a new leader waits for all three."""
        return all(view.synced.is_set() for view in (self, self._fleet, self._registry))

    def reconcile(self) -> None:
        """One round: start the loads and unloads each deployment needs now."""
        now = time.monotonic()
        for key in [k for k, (until, _) in self._refused.items() if until <= now]:
            del self._refused[key]
        for alias, deployment in list(self.wanted.items()):
            facts = self._facts(alias)
            loaded = {f.node_id for f in facts if f.loaded}
            gone = [
                key
                for key in self._adopted
                if key[1] == alias and key[0] not in loaded and key not in self._calls
            ]
            for key in gone:  # unloaded there: idle (finite keep-alive), restarted, evicted
                self._adopted.discard(key)
                if deployment.keep_alive_s > 0:
                    self._idled.add(key)
            if gone and deployment.keep_alive_s > 0:
                facts = self._facts(alias)  # the nodes just marked idle are not asked again
            decided = plan(deployment, facts)
            self.problems[alias] = decided.problem
            for node_id in decided.load:
                self._start(node_id, alias, self._load(node_id, alias, deployment))
            for node_id in decided.unload:
                self._start(node_id, alias, self._unload(node_id, alias))
            for f in facts:  # loaded on demand before it was deployed: keep it
                if (
                    f.loaded
                    and (f.node_id, alias) not in self._adopted
                    and matches(deployment.selector, f.labels)
                ):
                    self._start(f.node_id, alias, self._load(f.node_id, alias, deployment))

    def _start(self, node_id: str, alias: str, work, *, replace: bool = False) -> None:
        """Run ``work`` (a load or unload) for (node, model), one at a time;
        ``replace`` cancels the one in flight (an unload after an undeploy)."""
        key = (node_id, alias)
        running = self._calls.get(key)
        if running is not None and replace:
            running.cancel()
        elif running is not None:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._calls[key] = task

        def done(finished: asyncio.Task) -> None:
            if self._calls.get(key) is finished:
                del self._calls[key]
            if not finished.cancelled() and finished.exception() is not None:
                log.error(  # at once, not when the task is collected
                    "deployment %s on %s failed", alias, node_id, exc_info=finished.exception()
                )

        task.add_done_callback(done)

    def _facts(self, alias: str) -> list[NodeFacts]:
        now = time.monotonic()
        found = []
        for entry in list(self._fleet.nodes.values()):
            if not self._fleet.is_ready(entry):
                continue
            capacity = entry.record.capacity
            model = next((m for m in capacity.models if m.alias == alias), None)
            stored = next((s for s in capacity.stored_models if s.alias == alias), None)
            refused = self._refused.get((entry.node_id, alias))
            found.append(
                NodeFacts(
                    node_id=entry.node_id,
                    labels=dict(entry.record.labels),
                    loaded=model is not None,
                    loading=(entry.node_id, alias) in self._calls
                    or any(f.alias == alias for f in capacity.fetches),
                    cached=bool(stored and stored.cached),
                    memory_available=capacity.model_memory_available_bytes,
                    busy=(model.slots_total - model.slots_free + model.queue_depth)
                    if model is not None
                    else 0,
                    refused=(refused is not None and refused[0] > now)
                    or (entry.node_id, alias) in self._idled,
                )
            )
        return found

    async def _load(self, node_id: str, alias: str, deployment: models_pb2.Deployment) -> None:
        entry = self._fleet.nodes.get(node_id)
        if entry is None:
            return
        source = self._registry.source_for(alias, entry.record.capacity)
        request = node_pb2.LoadModelRequest(
            model=alias,
            source=source,
            keep_alive_s=deployment.keep_alive_s or FOREVER,
            peers=peers_for(self._fleet, alias, node_id),
        )
        try:
            await self._channels.stub(entry.record.address, node_id).LoadModel(
                request, timeout=LOAD_TIMEOUT_S
            )
            log.info("deployment %s: loaded on %s", alias, node_id)
            if alias not in self.wanted:  # undeployed while it loaded
                await self._unload(node_id, alias)
                return
        except grpc.RpcError as error:
            reason = reason_of(error)
            if reason is not Reason.MODEL_LOADED:  # it was there: adopted (keep-alive set)
                why = (
                    f"{node_id}: {reason.name if reason else error.code().name}: {error.details()}"
                )
                self._refused[(node_id, alias)] = (time.monotonic() + REFUSED_S, why)
                self.problems[alias] = why
                log.warning("deployment %s: %s", alias, why)
                return
        self._adopted.add((node_id, alias))

    async def _unload(self, node_id: str, alias: str) -> None:
        entry = self._fleet.nodes.get(node_id)
        self._adopted.discard((node_id, alias))
        if entry is None:
            return
        try:
            await self._channels.stub(entry.record.address, node_id).UnloadModel(
                node_pb2.UnloadModelRequest(model=alias), timeout=60
            )
            log.info("deployment %s: unloaded from %s", alias, node_id)
        except grpc.RpcError as error:
            log.warning("deployment %s: unload on %s failed: %s", alias, node_id, error.details())


def _describe(deployment: models_pb2.Deployment) -> str:
    replicas = deployment.replicas or "all"
    selector = ",".join(f"{k}={v}" for k, v in sorted(deployment.selector.items())) or "any node"
    keep = "forever" if deployment.keep_alive_s < 0 else f"{deployment.keep_alive_s:.0f}s idle"
    return f"replicas {replicas}, on {selector}, kept {keep}"
