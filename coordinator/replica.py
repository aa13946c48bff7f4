"""This coordinator replica's own lease and its announcement in etcd.

The replica lease carries everything that must vanish when the replica dies:
its record under ``coordinators/``, the turn locks of sessions it is serving,
and (later) its leadership of singleton loops. ``run`` is the one loop that
keeps the lease alive and grants a new one if it was lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from coordinator.etcd import Etcd
from coordinator.keys import Keys
from edgefleet.errors import Unavailable
from edgefleet.v1 import coordinator_pb2

log = logging.getLogger(__name__)


class ReplicaLease:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        *,
        coordinator_id: str,
        grpc_address: str,
        http_address: str = "",
        node_address: str = "",
        ttl_s: float = 5.0,
    ) -> None:
        self._etcd = etcd
        self._keys = keys
        self.coordinator_id = coordinator_id
        self._record = coordinator_pb2.CoordinatorRecord(
            coordinator_id=coordinator_id,
            grpc_address=grpc_address,
            http_address=http_address,
            node_address=node_address,
            started_at=time.time(),
            pid=os.getpid(),
        )
        self._ttl_s = ttl_s
        self.lease_id = 0

    async def acquire(self) -> int:
        self.lease_id = await self._etcd.grant(self._ttl_s)
        await self._etcd.put(
            self._keys.coordinator(self.coordinator_id),
            self._record.SerializeToString(),
            lease=self.lease_id,
        )
        return self.lease_id

    async def run(self) -> None:
        """Keep the lease alive until cancelled; re-acquire it after it is lost."""
        interval = max(0.5, self._ttl_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                if not self.lease_id or await self._etcd.refresh(self.lease_id) <= 0:
                    log.warning("replica lease lost; acquiring a new one")
                    await self.acquire()
            except Unavailable as exc:
                log.warning("cannot refresh the replica lease: %s", exc.message)

    async def replicas(self) -> list[coordinator_pb2.CoordinatorRecord]:
        """Every live coordinator replica (this one included)."""
        kvs, _ = await self._etcd.get_prefix(self._keys.coordinators)
        return [coordinator_pb2.CoordinatorRecord.FromString(kv.value) for kv in kvs]

    async def node_endpoints(self) -> list[str]:
        """Where nodes register: every live replica's node listener (mutual TLS)."""
        try:
            records = await self.replicas()
        except Unavailable:
            records = [self._record]
        return sorted({r.node_address for r in records if r.node_address})

    async def release(self) -> None:
        if self.lease_id:
            await self._etcd.revoke(self.lease_id)
            self.lease_id = 0
