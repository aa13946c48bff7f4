"""This coordinator's own stalls must not look like its nodes' silence.

A stall of the coordinator's event loop (a long computation, a GC pause, the
machine swapping) stops it from reading heartbeats and from refreshing the
nodes' etcd leases. Without care, every node it serves would be evicted for a
silence the coordinator itself caused. Two guards:

- ``LoopClock`` ticks on the loop and says how long the loop was stalled
  since a given moment, so a heartbeat timeout that overlapped a stall is not
  counted against the node. It also reports the lag as a metric.
- ``LeaseKeeper`` runs in its own thread, with its own event loop and its own
  etcd connection. While the main loop is stalled it keeps alive the leases
  of the nodes that were heartbeating when the stall began; once the loop
  runs again it stops, so a node that really died meanwhile loses its lease
  one TTL later, as it would have anyway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

from edgefleet.errors import EdgefleetError

log = logging.getLogger(__name__)

TICK_S = 0.1
# A tick this much later than asked counts as a stall of the loop.
STALL_THRESHOLD_S = 0.25


class LoopClock:
    """Measures the lag of the event loop it runs on (``run`` is its task)."""

    def __init__(
        self, tick_s: float = TICK_S, observe: Callable[[float], None] | None = None
    ) -> None:
        self.tick_s = tick_s
        self.last_tick = time.monotonic()
        self._observe = observe  # lag seconds per tick: a metric
        self._stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=512)

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            lag = max(0.0, now - before - self.tick_s)
            if self._observe is not None:
                self._observe(lag)
            if lag > STALL_THRESHOLD_S:
                self._stalls.append((before + self.tick_s, now))
                if lag >= 1.0:
                    log.warning("the event loop was stalled for %.1fs", lag)
            self.last_tick = now

    def stalled_now(self, now: float | None = None) -> float:
        """How long the loop has gone without a tick (0 while it keeps time)."""
        gap = (now if now is not None else time.monotonic()) - self.last_tick - self.tick_s
        return gap if gap > STALL_THRESHOLD_S else 0.0

    def stalled_since(self, start: float, now: float | None = None) -> float:
        """Seconds the loop was stalled after ``start`` (monotonic), the stall
        that may just have ended (not yet ticked) included."""
        now = now if now is not None else time.monotonic()
        total = sum(end - max(begin, start) for begin, end in self._stalls if end > start)
        ongoing = self.stalled_now(now)
        if ongoing:
            total += min(ongoing, now - start)
        return total


class LeaseKeeper:
    """Refreshes the given leases from a thread of its own while ``clock``'s
    loop is stalled. ``leases()`` is read while the loop runs normally, so the
    set kept alive is the one from just before the stall."""

    def __init__(
        self,
        clock: LoopClock,
        leases: Callable[[], list[int]],
        make_etcd: Callable[[], object],
        *,
        lease_ttl_s: float,
    ) -> None:
        self._clock = clock
        self._leases = leases
        self._make_etcd = make_etcd  # an Etcd, built on the keeper's own loop
        self._period_s = max(0.05, lease_ttl_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self.kept = 0  # refreshes made during stalls (tests and logs)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            asyncio.run(self._keep())
        except Exception:  # not under the daemon's Supervisor: say so at once
            log.exception("the lease keeper stopped; this replica's stalls may evict its nodes")

    async def _keep(self) -> None:
        etcd = self._make_etcd()
        await etcd.connect()
        snapshot: list[int] = []
        reported = False
        try:
            while not self._stop.is_set():
                await asyncio.sleep(self._period_s)
                if not self._clock.stalled_now():
                    snapshot = list(self._leases())
                    reported = False
                    continue
                if not reported and snapshot:
                    log.warning(
                        "event loop stalled %.1fs: keeping %d node lease(s) alive meanwhile",
                        self._clock.stalled_now(),
                        len(snapshot),
                    )
                    reported = True
                for lease in snapshot:
                    try:
                        await etcd.refresh(lease)
                        self.kept += 1
                    except EdgefleetError:
                        pass  # etcd is down: nothing to keep; the loop will see it too
        finally:
            await etcd.close()
