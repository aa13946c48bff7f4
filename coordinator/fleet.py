"""The replica's in-memory view of the fleet, mirrored from etcd.

A get-then-watch on the node and drain prefixes keeps it current within
milliseconds of any replica's write; placement reads only this view. On top of
what etcd says, each replica keeps two local facts: nodes it saw fail
(excluded at once, before their lease runs out) and the generations it is
running on each node, compared with how many of them the node's last report
counts (nodes report their generations per origin), so that placement corrects
a report that is up to a heartbeat old and counts requests still on their way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator.etcd import Etcd, KeyValue
from coordinator.keys import Keys
from edgefleet.errors import Reason, error_of
from edgefleet.v1 import common_pb2, coordinator_pb2

log = logging.getLogger(__name__)
# How long a node that broke the protocol stays out of placement.
QUARANTINE_S = 60.0


@dataclass
class NodeEntry:
    record: coordinator_pb2.NodeStatus
    epoch: int  # create_revision of the node key
    lease: int
    mod_revision: int

    @property
    def node_id(self) -> str:
        return self.record.node_id

    @property
    def tokens_per_second(self) -> float:
        return self.record.capacity.tokens_per_second

    @property
    def low_power(self) -> bool:
        return self.record.capacity.power.low_power

    def model(self, alias: str) -> common_pb2.LoadedModel | None:
        for model in self.record.capacity.models:
            if model.alias == alias:
                return model
        return None


class FleetView:
    def __init__(self, etcd: Etcd, keys: Keys, *, origin: str = "") -> None:
        self._etcd = etcd
        self._keys = keys
        self.nodes: dict[str, NodeEntry] = {}
        self.drained: set[str] = set()
        self._suspects: dict[str, float] = {}  # node -> wall time it was seen failing
        self._quarantined: dict[str, float] = {}  # node -> monotonic time it may return
        # This process, as nodes count it (GenerateRequest.origin); unique per
        # process, so a restarted replica is not charged for its predecessor.
        self.origin = origin or f"coordinator/{uuid.uuid4().hex[:12]}"
        self._active: collections.Counter[str] = collections.Counter()
        self._reported: collections.Counter[str] = collections.Counter()
        self.synced = asyncio.Event()
        self._listeners: list[Callable[[str], None]] = []

    # --- mirroring etcd (the view's one long-lived loop) ---------------------------
    async def run(self) -> None:
        """Mirror nodes and drains until cancelled; re-list after any watch failure."""
        await self._etcd.mirror(
            {
                self._keys.nodes: (self._apply_node, self._forget_nodes),
                self._keys.drains: (self._apply_drain, self._forget_drains),
            },
            self.synced,
        )

    def _forget_nodes(self, seen: set[str]) -> None:
        for node_id in [n for n in self.nodes if self._keys.node(n) not in seen]:
            self._remove(node_id)

    def _forget_drains(self, seen: set[str]) -> None:
        self.drained &= {Keys.last_segment(key) for key in seen}

    def _apply_node(self, kv: KeyValue, *, deleted: bool) -> None:
        node_id = Keys.last_segment(kv.key)
        if deleted:
            self._remove(node_id)
            return
        record = coordinator_pb2.NodeStatus.FromString(kv.value)
        record.epoch = kv.create_revision
        self.nodes[node_id] = NodeEntry(
            record=record, epoch=kv.create_revision, lease=kv.lease, mod_revision=kv.mod_revision
        )
        # The generations of this replica the node counted when it reported;
        # a node that does not count by origin (an older version, mid rolling
        # upgrade): those running here when its report arrived.
        if record.capacity.counts_origins:
            self._reported[node_id] = record.capacity.active_by_origin.get(self.origin, 0)
        else:
            self._reported[node_id] = self._active[node_id]
        suspected_at = self._suspects.get(node_id)
        if suspected_at is not None and record.heartbeat_at > suspected_at:
            del self._suspects[node_id]
        self._notify(node_id)

    def _apply_drain(self, kv: KeyValue, *, deleted: bool) -> None:
        node_id = Keys.last_segment(kv.key)
        if deleted:
            self.drained.discard(node_id)
        else:
            self.drained.add(node_id)
        self._notify(node_id)

    def _remove(self, node_id: str) -> None:
        if self.nodes.pop(node_id, None) is not None:
            log.info("node %s left the fleet", node_id)
        self._reported.pop(node_id, None)
        self._suspects.pop(node_id, None)
        self._notify(node_id)

    def on_change(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _notify(self, node_id: str) -> None:
        for listener in self._listeners:
            listener(node_id)

    # --- local knowledge ---------------------------------------------------------------
    def dispatch(self, node_id: str) -> None:
        """Count a generation this replica sends to ``node_id``, from the moment
        it is chosen (so requests placed in the same instant see each other)."""
        self._active[node_id] += 1

    def release(self, node_id: str) -> None:
        """The generation counted by ``dispatch`` ended (or was refused)."""
        self._active[node_id] -= 1

    def pending(self, node_id: str) -> int:
        """Generations started (+) or finished (-) here that the node's last
        report does not count: on their way, or sent after it."""
        return self._active[node_id] - self._reported[node_id]

    def suspect(self, node_id: str, reason: str) -> None:
        """Exclude a node from placement here until it reports again."""
        if node_id in self.nodes and node_id not in self._suspects:
            log.warning("excluding node %s from placement: %s", node_id, reason)
        self._suspects[node_id] = time.time()

    def quarantine(self, node_id: str, reason: str, seconds: float = QUARANTINE_S) -> None:
        """Exclude a node that broke the protocol for ``seconds`` here, whatever
        it reports meanwhile (a node that answers but not like a node would
        otherwise win placement back with every heartbeat)."""
        until = time.monotonic() + seconds
        if self._quarantined.get(node_id, 0.0) < until:
            log.warning("quarantining node %s for %.0fs: %s", node_id, seconds, reason)
            self._quarantined[node_id] = until

    def is_suspect(self, node_id: str) -> bool:
        until = self._quarantined.get(node_id)
        if until is not None:
            if time.monotonic() < until:
                return True
            del self._quarantined[node_id]
        return node_id in self._suspects

    def state_of(self, entry: NodeEntry) -> int:
        """The state placement sees: etcd's, overridden by drains and local suspicion."""
        if entry.node_id in self.drained or entry.record.capacity.draining:
            return common_pb2.NODE_STATE_DRAINING
        return entry.record.state

    def is_ready(self, entry: NodeEntry) -> bool:
        """Placement may use it: ready in etcd, not drained, not suspected here."""
        return self.state_of(entry) == common_pb2.NODE_STATE_READY and not self.is_suspect(
            entry.node_id
        )

    def could_take_over(self, model: str, failed: Iterable[str]) -> bool:
        """Some node other than ``failed`` holds ``model`` and is not draining:
        it may take a continued reply once it has room or reports again."""
        failed = set(failed)
        return any(
            entry.node_id not in failed
            and entry.model(model) is not None
            and self.state_of(entry) == common_pb2.NODE_STATE_READY
            for entry in self.nodes.values()
        )

    def ready_nodes(self) -> list[NodeEntry]:
        return [entry for entry in self.nodes.values() if self.is_ready(entry)]

    def model_sizes(self) -> dict[str, int]:
        """Models loaded on ready nodes, with their file size in bytes."""
        sizes: dict[str, int] = {}
        for entry in self.ready_nodes():
            for model in entry.record.capacity.models:
                sizes[model.alias] = max(sizes.get(model.alias, 0), model.file_size_bytes)
        return sizes

    def models(self) -> dict[str, int]:
        """Every model alias in the fleet with the number of ready nodes serving it."""
        counts: dict[str, int] = {}
        ready = {entry.node_id for entry in self.ready_nodes()}
        for entry in self.nodes.values():
            for alias in entry.record.models:
                counts.setdefault(alias, 0)
                if entry.node_id in ready and entry.model(alias) is not None:
                    counts[alias] += 1
        return counts

    # --- operations --------------------------------------------------------------------
    async def set_drain(self, node_id: str, drain: bool) -> coordinator_pb2.NodeStatus:
        """Mark a node draining (no new work) or undo it, for every replica."""
        entry = self.nodes.get(node_id)
        if entry is None:
            raise error_of(Reason.NODE_NOT_FOUND, f"node {node_id!r} is not in the fleet")
        if drain:
            await self._etcd.put(self._keys.drain(node_id), b"1")
        else:
            await self._etcd.delete(self._keys.drain(node_id))
        status = coordinator_pb2.NodeStatus()
        status.CopyFrom(entry.record)
        status.state = common_pb2.NODE_STATE_DRAINING if drain else common_pb2.NODE_STATE_READY
        return status

    def statuses(
        self, last_beats: dict[str, float], sessions: dict[str, int], now: float
    ) -> list[coordinator_pb2.NodeStatus]:
        """Every node as an operator sees it: record, state, heartbeat age, sessions."""
        statuses = []
        for entry in sorted(self.nodes.values(), key=lambda e: e.node_id):
            status = coordinator_pb2.NodeStatus()
            status.CopyFrom(entry.record)
            status.state = self.state_of(entry)
            # The replica holding the node's stream knows its last beat; others
            # know when its record was last written.
            last_beat = max(last_beats.get(entry.node_id, 0.0), entry.record.heartbeat_at)
            status.last_heartbeat_age_seconds = max(0.0, now - last_beat)
            status.sessions = sessions.get(entry.node_id, 0)
            statuses.append(status)
        return statuses


def without_details(status: coordinator_pb2.FleetStatusResponse) -> None:
    """What a non-admin caller sees of the fleet: no addresses, pids or labels
    (where the devices are and what runs on them is the operators' business)."""
    for node in status.nodes:
        node.address = ""
        node.pid = 0
        node.labels.clear()
        node.coordinator_id = ""
        for model in node.capacity.models:
            model.path = ""
    for replica in status.coordinators:
        replica.grpc_address = replica.http_address = replica.node_address = ""
        replica.pid = 0
