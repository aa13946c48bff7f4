"""Singleton maintenance on one replica, chosen by an etcd election.

Every replica campaigns for ``<prefix>leader/maintenance`` with a transaction
that creates the key under its own replica lease only if it does not exist.
The winner runs the maintenance loop; when it dies its lease expires, the key
goes with it, and the next campaign (replicas retry every second) elects
another replica. Maintenance today is etcd compaction: heartbeats rewrite node
records, and without compaction etcd keeps every old revision forever.
"""

from __future__ import annotations

import asyncio
import logging

from coordinator.etcd import Compare, Etcd, Put
from coordinator.keys import Keys
from coordinator.replica import ReplicaLease
from edgefleet.errors import Unavailable

log = logging.getLogger(__name__)


class Leadership:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        replica: ReplicaLease,
        *,
        campaign_interval_s: float = 1.0,
        compaction_interval_s: float = 300.0,
        keep_revisions: int = 10_000,
    ) -> None:
        self._etcd = etcd
        self._key = keys.leader("maintenance")
        self._replica = replica
        self._campaign_interval_s = campaign_interval_s
        self._compaction_interval_s = compaction_interval_s
        self._keep_revisions = keep_revisions
        self.is_leader = False

    async def leader_id(self) -> str:
        kv = await self._etcd.get(self._key)
        return kv.value.decode() if kv else ""

    async def run(self) -> None:
        """Campaign until elected, then maintain while still the leader."""
        me = self._replica.coordinator_id.encode()
        next_compaction = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                # Campaign: create the key only if nobody holds it; then see who does.
                await self._etcd.txn(
                    [Compare(self._key, mod_revision=0)],
                    [Put(self._key, me, lease=self._replica.lease_id)],
                )
                current = await self._etcd.get(self._key)
                leading = current is not None and current.value == me
                if leading != self.is_leader:
                    log.info("%s maintenance leadership", "took" if leading else "lost")
                    self.is_leader = leading
                if leading and loop.time() >= next_compaction:
                    await self._compact()
                    next_compaction = loop.time() + self._compaction_interval_s
            except Unavailable as exc:
                if self.is_leader:
                    log.warning("leadership uncertain, etcd unreachable: %s", exc.message)
                self.is_leader = False
            await asyncio.sleep(self._campaign_interval_s)

    async def _compact(self) -> None:
        revision = await self._etcd.revision()
        target = revision - self._keep_revisions
        if target > 0:
            await self._etcd.compact(target)
            log.info("compacted etcd history before revision %d", target)
