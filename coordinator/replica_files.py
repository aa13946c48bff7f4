"""Every coordinator replica keeps a copy of every model file the registry names.

``models add`` writes the file on the replica that received the upload only.
Each replica's loop here fetches the files it lacks from the other replicas'
node listeners (``ModelService.FetchModel`` with its coordinator certificate;
resumed and sha256-checked like a node's fetch), so a node may ask any
replica for any file; and it deletes the files no record names any more
(removed, or replaced through another replica), so a replica's disk holds
what the registry says and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from coordinator.model_registry import ModelRegistry
from edgefleet.errors import EdgefleetError, Unavailable
from edgefleet.model_fetch import ModelFetcher
from edgefleet.v1 import coordinator_pb2

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 5.0


class ReplicaFiles:
    def __init__(
        self,
        registry: ModelRegistry,
        replicas: Callable[[], Awaitable[list[coordinator_pb2.CoordinatorRecord]]],
        *,
        coordinator_id: str,
        channel: Callable[[str], grpc.aio.Channel],
        interval_s: float = SYNC_INTERVAL_S,
    ) -> None:
        self._registry = registry
        self._replicas = replicas
        self._coordinator_id = coordinator_id
        self._interval_s = interval_s
        self._others: list[str] = []
        self._fetcher = ModelFetcher(lambda: self._others, channel, disk="this coordinator's disk")
        self._reported: set[str] = set()  # shas whose failure was logged once

    async def run(self) -> None:
        await self._registry.synced.wait()
        while True:
            try:
                await self.sync()
            except Unavailable as exc:
                log.warning("model files not synced with the other replicas: %s", exc.message)
            await asyncio.sleep(self._interval_s)

    async def sync(self) -> None:
        missing = self._registry.missing_files()
        if missing:
            self._others = [
                # A secure replica serves files on its node listener; an
                # insecure one serves everything on its one port.
                record.node_address or record.grpc_address
                for record in await self._replicas()
                if record.coordinator_id != self._coordinator_id
            ]
        for alias, file in missing:
            try:
                await self._fetcher.fetch(alias, file, self._registry.stored_path(file.sha256))
            except EdgefleetError as error:
                # Kept partial; tried again next round (the replica that has it
                # may be restarting). Said once, not every few seconds.
                if file.sha256 not in self._reported:
                    self._reported.add(file.sha256)
                    log.warning("no copy of %s (%s) yet: %s", alias, file.sha256[:12], error)
                continue
            self._reported.discard(file.sha256)
            log.info("copied %s (%s) from another replica", alias, file.sha256[:12])
        await self._registry.drop_unreferenced()
