"""Node membership: registration, heartbeats, leases and fencing, in one place.

A node registers through any replica; the replica grants the node an etcd
lease (TTL ``lease_ttl_s``) and writes the node's record under it. The
record's create revision is the node's *epoch*: every heartbeat names it, and
a heartbeat for an epoch that no longer exists (the lease expired, the node
was replaced) is answered with REREGISTER, so a node that was cut off must
register again before it gets work. Each heartbeat refreshes the lease; the
record is rewritten when something placement uses changed, or every
``record_refresh_s`` otherwise, and never more often than
``record_min_interval_s`` (``coordinator.node_limits``: a record's size and
rewrite rate are bounded, so no node can fill etcd).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from coordinator.etcd import Compare, Etcd, Put
from coordinator.fleet import FleetView, NodeEntry
from coordinator.keys import Keys
from coordinator.loop_watch import LoopClock
from coordinator.node_limits import RecordPacer, record_too_large, trim_capacity
from edgefleet.auth import CALLER
from edgefleet.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Reason,
    Unavailable,
    error_of,
)
from edgefleet.v1 import common_pb2, coordinator_pb2

log = logging.getLogger(__name__)

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
Command = coordinator_pb2.HeartbeatResponse.Command
# What one node may claim at most, whatever it says (a model's slots, its queue).
MAX_SLOTS = 256
MAX_QUEUE = 4096
MAX_RESERVED = 64  # continuation slots per model
# A silent window in which this replica's loop stalled this long is not the node's fault.
STALL_EXCUSE_S = 0.5


def validate_address(address: str) -> None:
    match = HOST_PORT.match(address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise InvalidArgument(
            f"address must be host:port with a port in 1-65535, got {address!r}",
            reason=Reason.INVALID_REQUEST,
        )


def placement_signature(capacity: common_pb2.Capacity, state: int) -> tuple:
    """What placement reads from a record; a change here is written at once."""
    return (
        state,
        capacity.draining,
        tuple(
            (
                m.alias,
                m.slots_total,
                m.slots_free,
                m.queue_depth,
                m.queue_limit,
                m.continuation_slots_free,
            )
            for m in capacity.models
        ),
        # What on-demand loading reads (memory is refreshed with the record).
        tuple((m.alias, m.cached) for m in capacity.stored_models),
    )


def _clamp(model: common_pb2.LoadedModel, slots_limit: int, queue_limit: int) -> None:
    model.slots_total = max(0, min(model.slots_total, slots_limit, MAX_SLOTS))
    model.slots_free = max(0, min(model.slots_free, model.slots_total))
    model.queue_limit = max(0, min(model.queue_limit, queue_limit, MAX_QUEUE))
    model.queue_depth = max(0, min(model.queue_depth, model.queue_limit))
    model.continuation_slots_total = max(0, min(model.continuation_slots_total, MAX_RESERVED))
    model.continuation_slots_free = max(
        0, min(model.continuation_slots_free, model.continuation_slots_total)
    )


def checked_capacity(
    declared: common_pb2.Capacity, reported: common_pb2.Capacity
) -> common_pb2.Capacity:
    """A node's report, held to what it declared when it registered.

    Placement trusts these numbers, so a node may not grow past its
    registration (a model loaded since then gets the largest declared size),
    report more free slots than it has, or a queue deeper than its limit.
    """
    limits = {m.alias: (m.slots_total, m.queue_limit) for m in declared.models}
    ceiling = (
        max((s for s, _ in limits.values()), default=1),
        max((q for _, q in limits.values()), default=0),
    )
    checked = common_pb2.Capacity()
    checked.CopyFrom(reported)
    for model in checked.models:
        _clamp(model, *limits.get(model.alias, ceiling))
    return checked


def check_speaker(node_id: str) -> None:
    """A node (fleet certificate) may register, beat and leave only as itself;
    and a node id is one before it names an etcd key (an insecure fleet too)."""
    if not NODE_ID.match(node_id):
        raise InvalidArgument(
            f"node_id {node_id[:140]!r} must be 1-128 letters, digits, '.', '_' or '-'",
            reason=Reason.INVALID_REQUEST,
        )
    caller = CALLER.get()
    if caller.kind == "node" and caller.principal_id != node_id:
        raise error_of(
            Reason.NOT_PERMITTED,
            f"this certificate is node {caller.principal_id!r}'s; it may not speak for "
            f"node {node_id!r}",
        )


def declared_capacity(capacity: common_pb2.Capacity) -> common_pb2.Capacity:
    """What a registration may declare: bounded slots and queues, a bounded report."""
    bounded = common_pb2.Capacity()
    bounded.CopyFrom(capacity)
    trim_capacity(bounded)
    for model in bounded.models:
        _clamp(model, MAX_SLOTS, MAX_QUEUE)
    return bounded


class Membership:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        fleet: FleetView,
        *,
        coordinator_id: str,
        lease_ttl_s: float = 3.0,
        heartbeat_interval_s: float = 1.0,
        record_refresh_s: float = 5.0,
        record_min_interval_s: float | None = None,
        admit: Callable[[str], Awaitable[dict[str, str]]] | None = None,
        node_endpoints: Callable[[], Awaitable[list[str]]] | None = None,
        clock: LoopClock | None = None,
    ) -> None:
        # admit(node_id): raises if the node's identity may not register
        # (pending approval, revoked), else gives the labels its join token
        # set (a node does not choose its own); None in a fleet run --insecure.
        self._admit = admit
        self._node_endpoints = node_endpoints
        # This replica's event-loop clock: its own stalls are not nodes' silence.
        self._clock = clock
        self._etcd = etcd
        self._keys = keys
        self._fleet = fleet
        self._coordinator_id = coordinator_id
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._record_refresh_s = record_refresh_s
        # A node's record is rewritten at most this often, whatever it reports.
        self._record_min_interval_s = (
            heartbeat_interval_s / 2 if record_min_interval_s is None else record_min_interval_s
        )
        # Wall time of the last heartbeat each node sent to this replica.
        self.last_beat: dict[str, float] = {}
        # Heartbeats missed in a row before the node counts as lost.
        self.silence_timeout_s = 2 * heartbeat_interval_s + 0.5
        # Set while this replica shuts down: its heartbeat streams end then
        # because of us, not because the nodes died.
        self.closing = False
        # The task serving each node's heartbeat stream on this replica.
        self._streams: dict[str, asyncio.Task] = {}

    def live_leases(self) -> list[int]:
        """Leases of the nodes heartbeating to this replica now (read from the
        lease keeper's thread: a whole-dict copy and single lookups, which the
        GIL keeps atomic)."""
        now = time.time()
        return [
            entry.lease
            for node_id, beat_at in list(self.last_beat.items())
            if now - beat_at < self.silence_timeout_s and (entry := self._fleet.nodes.get(node_id))
        ]

    async def _next_beat(self, beats):
        """The next heartbeat; TimeoutError when the node fell silent (frozen,
        cut off) although its connection looks open. A window in which this
        replica's own loop was stalled does not count: it gets another."""
        pending = asyncio.ensure_future(anext(beats))
        try:
            while True:
                started = time.monotonic()
                done, _ = await asyncio.wait({pending}, timeout=self.silence_timeout_s)
                if done:
                    return pending.result()
                stalled = self._clock.stalled_since(started) if self._clock else 0.0
                if stalled < STALL_EXCUSE_S:
                    raise TimeoutError
                log.info("heartbeat wait overlapped a %.1fs stall of this replica", stalled)
        finally:
            if not pending.done():
                pending.cancel()

    # --- register ---------------------------------------------------------------------
    async def register(
        self, request: coordinator_pb2.RegisterRequest
    ) -> coordinator_pb2.RegisterResponse:
        caller = CALLER.get()
        node_id = (
            request.node_id
            or (caller.principal_id if caller.kind == "node" else "")
            or request.address.replace(":", "-").replace("[", "").replace("]", "")
        )
        check_speaker(node_id)
        validate_address(request.address)
        models = [m for m in request.models if m.strip()]
        if not models:
            raise InvalidArgument(
                "a node must register with at least one model", reason=Reason.INVALID_REQUEST
            )
        labels = dict(request.labels)
        if self._admit is not None:
            labels = await self._admit(node_id)
        key = self._keys.node(node_id)
        existing = await self._etcd.get(key)
        if existing is not None:
            current = coordinator_pb2.NodeStatus.FromString(existing.value)
            if current.address != request.address:
                message = f"node id {node_id!r} is held by a live node at {current.address}"
                if caller.kind == "node":
                    message += (
                        " that presents this same identity: two devices share one identity "
                        "(a cloned disk or state dir?). Give this device its own: remove its "
                        "state dir and join it with a new token"
                    )
                raise AlreadyExists(message, reason=Reason.NODE_ID_TAKEN)
            # The same node restarted before its old lease ran out: replace it.
            log.info(
                "node %s re-registers from %s; dropping its old lease", node_id, current.address
            )
            await self._etcd.revoke(existing.lease)
        record = coordinator_pb2.NodeStatus(
            node_id=node_id,
            address=request.address,
            state=common_pb2.NODE_STATE_READY,
            capacity=declared_capacity(request.capacity),
            models=models,
            pid=request.pid,
            labels=labels,
            heartbeat_at=time.time(),
            coordinator_id=self._coordinator_id,
            version=request.version,
        )
        too_large = record_too_large(record)
        if too_large is not None:
            raise too_large
        lease = await self._etcd.grant(self.lease_ttl_s)
        created, revision = await self._etcd.txn(
            [Compare(key, mod_revision=0)], [Put(key, record.SerializeToString(), lease=lease)]
        )
        if not created:
            await self._etcd.revoke(lease)
            raise AlreadyExists(
                f"node id {node_id!r} was registered concurrently", reason=Reason.NODE_ID_TAKEN
            )
        log.info("node %s registered at %s (epoch %d)", node_id, request.address, revision)
        return coordinator_pb2.RegisterResponse(
            node_id=node_id,
            lease_ttl_seconds=self.lease_ttl_s,
            heartbeat_interval_seconds=self.heartbeat_interval_s,
            epoch=revision,
            node_endpoints=await self._node_endpoints() if self._node_endpoints else [],
        )

    # --- heartbeats ---------------------------------------------------------------------
    async def heartbeats(
        self, requests: AsyncIterator[coordinator_pb2.HeartbeatRequest]
    ) -> AsyncIterator[coordinator_pb2.HeartbeatResponse]:
        """Answer one node's heartbeat stream until it ends or the node is fenced."""
        node_id = ""
        entry: NodeEntry | None = None
        pacer = RecordPacer(self._record_min_interval_s, self._record_refresh_s)
        goodbye = False
        beats = aiter(requests)
        try:
            while True:
                try:
                    beat = await self._next_beat(beats)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    log.warning(
                        "node %s sent no heartbeat for %.1fs", node_id, self.silence_timeout_s
                    )
                    break
                check_speaker(beat.node_id)
                node_id = beat.node_id
                trim_capacity(beat.capacity)
                self._streams[node_id] = asyncio.current_task()
                entry = self._fleet.nodes.get(node_id)
                if entry is None or entry.epoch != beat.epoch:
                    # The lease expired or another registration replaced this one.
                    entry = await self._current_entry(node_id, beat.epoch)
                    if entry is None:
                        log.warning("fencing node %s: epoch %d is gone", node_id, beat.epoch)
                        goodbye = True
                        yield coordinator_pb2.HeartbeatResponse(command=Command.COMMAND_REREGISTER)
                        return
                try:
                    # Paced: a node beating faster than its interval costs etcd no more.
                    paced_at = time.monotonic()
                    if pacer.lease_due(paced_at):
                        if await self._etcd.refresh(entry.lease) <= 0:
                            goodbye = True
                            yield coordinator_pb2.HeartbeatResponse(
                                command=Command.COMMAND_REREGISTER
                            )
                            return
                        pacer.lease_refreshed(paced_at)
                    signature = placement_signature(beat.capacity, beat.state)
                    if pacer.record_due(signature, paced_at):
                        if not await self._write_record(entry, beat, time.time()):
                            goodbye = True
                            yield coordinator_pb2.HeartbeatResponse(
                                command=Command.COMMAND_REREGISTER
                            )
                            return
                        pacer.record_written(signature, paced_at)
                except Unavailable as exc:
                    # etcd is down: keep the stream; the node's lease may lapse.
                    log.warning("heartbeat of %s not recorded: %s", node_id, exc.message)
                self.last_beat[node_id] = time.time()
                # A drain is placement's business (the drain key), so undoing it
                # takes effect at once; the node itself keeps serving its streams.
                yield coordinator_pb2.HeartbeatResponse(
                    command=Command.COMMAND_NONE, lease_ttl_seconds=self.lease_ttl_s
                )
        finally:
            if self._streams.get(node_id) is asyncio.current_task():
                del self._streams[node_id]
            if entry is not None and not goodbye and not self.closing:
                # Shielded: a cancelled stream must still end the registration.
                await asyncio.shield(self._node_lost(entry))

    async def cut_off(self, node_id: str) -> None:
        """A revoked node leaves the fleet now: its heartbeat stream here ends
        and its registration is deleted, so every replica stops placing on it
        and its streams fail over at their next chunk."""
        stream = self._streams.pop(node_id, None)
        if stream is not None:
            stream.cancel()
        kv = await self._etcd.get(self._keys.node(node_id))
        if kv is not None:
            await self._etcd.revoke(kv.lease)
            log.warning("node %s was revoked: cut off from the fleet", node_id)

    async def _node_lost(self, entry: NodeEntry) -> None:
        """The heartbeat stream ended without a goodbye: the node died or was cut off.

        Exclude it here at once and end its registration in etcd, so every
        replica drops it within milliseconds instead of a lease TTL. A node
        that is in fact alive is fenced and registers again.
        """
        self._fleet.suspect(entry.node_id, "heartbeat stream broke")
        try:
            if await self._current_entry(entry.node_id, entry.epoch) is not None:
                await self._etcd.revoke(entry.lease)
                log.warning("node %s lost its heartbeat stream: registration ended", entry.node_id)
        except Unavailable as exc:
            log.warning("node %s lost; its lease will expire (%s)", entry.node_id, exc.message)

    async def _current_entry(self, node_id: str, epoch: int) -> NodeEntry | None:
        """The node's entry if its registration ``epoch`` still exists in etcd."""
        kv = await self._etcd.get(self._keys.node(node_id))
        if kv is None or kv.create_revision != epoch:
            return None
        return NodeEntry(
            record=coordinator_pb2.NodeStatus.FromString(kv.value),
            epoch=kv.create_revision,
            lease=kv.lease,
            mod_revision=kv.mod_revision,
        )

    async def _write_record(
        self, entry, beat: coordinator_pb2.HeartbeatRequest, now: float
    ) -> bool:
        record = coordinator_pb2.NodeStatus()
        record.CopyFrom(entry.record)
        record.capacity.CopyFrom(checked_capacity(entry.record.capacity, beat.capacity))
        record.state = (
            common_pb2.NODE_STATE_DRAINING
            if beat.capacity.draining
            else (beat.state or common_pb2.NODE_STATE_READY)
        )
        record.models[:] = [m.alias for m in record.capacity.models] or list(record.models)
        record.heartbeat_at = now
        record.coordinator_id = self._coordinator_id
        too_large = record_too_large(record)
        if too_large is not None:
            raise too_large  # ends the stream: the node breaks the protocol
        key = self._keys.node(entry.node_id)
        # Only while this registration (epoch) exists: never resurrect a fenced node.
        written, _ = await self._etcd.txn(
            [Compare(key, create_revision=entry.epoch)],
            [Put(key, record.SerializeToString(), lease=entry.lease)],
        )
        return written

    # --- leave ---------------------------------------------------------------------------
    async def deregister(self, request: coordinator_pb2.DeregisterRequest) -> None:
        check_speaker(request.node_id)
        kv = await self._etcd.get(self._keys.node(request.node_id))
        if kv is None:
            return
        if kv.create_revision != request.epoch:
            raise FailedPrecondition(
                f"node {request.node_id} epoch {request.epoch} is not the current registration",
                reason=Reason.STALE_EPOCH,
            )
        await self._etcd.revoke(kv.lease)  # deletes the record with it
        log.info("node %s deregistered", request.node_id)
