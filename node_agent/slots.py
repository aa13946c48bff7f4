"""Admission control: a fixed number of parallel slots and a bounded queue.

A request either gets a slot at once, waits in a FIFO queue of bounded
length, or is refused at once with RESOURCE_EXHAUSTED: a full node never
makes a caller hang.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from edgefleet.errors import Reason, ResourceExhausted, Unavailable


class SlotPool:
    """``slots`` slots for everyone, plus ``reserved`` slots that only continued
    replies (a reply cut off by a node failure elsewhere) may take, so such a
    reply restarts at once even when every ordinary slot is busy."""

    def __init__(self, slots: int, queue_limit: int, reserved: int = 0) -> None:
        if slots < 1:
            raise ValueError("a model needs at least one slot")
        if queue_limit < 0 or reserved < 0:
            raise ValueError("queue limit and reserved slots must be >= 0")
        self.total = slots
        self.reserved = reserved
        self.queue_limit = queue_limit
        # Least recently used first: an idle slot's KV cache (a session's
        # prefix) survives as long as possible.
        self._free: collections.deque[int] = collections.deque(range(slots))
        self._reserve: collections.deque[int] = collections.deque(range(slots, slots + reserved))
        # (future, continuation): continuations wait at the head.
        self._waiters: collections.deque[tuple[asyncio.Future[int], bool]] = collections.deque()
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def reserve_free(self) -> int:
        return len(self._reserve)

    @property
    def busy(self) -> int:
        return self.total - len(self._free)

    @property
    def queue_depth(self) -> int:
        return sum(1 for waiter, _ in self._waiters if not waiter.done())

    def next_position(self, *, continuation: bool = False) -> int:
        """The queue position (from 1) a request queued now would get."""
        if continuation:
            return 1 + sum(1 for waiter, cont in self._waiters if cont and not waiter.done())
        return 1 + self.queue_depth

    def would_queue(self, *, continuation: bool = False) -> bool:
        """Whether a request arriving now would wait in the queue (rather than
        get a slot at once or be refused)."""
        if self._closed:
            return False
        if self._free and (continuation or not self.queue_depth):
            return False
        if continuation:
            return not self._reserve
        return self.queue_depth < self.queue_limit

    @asynccontextmanager
    async def acquire(
        self,
        retry_after_s: float = 1.0,
        *,
        continuation: bool = False,
        prefer: Callable[[int], int] | None = None,
    ) -> AsyncIterator[int]:
        """Hold one slot (its index) for the duration of the block.

        ``continuation``: a reply already half-way to its user (continued after
        a failure elsewhere). It takes a free slot, else a reserved one, else
        waits at the head of the queue; the queue limit does not refuse it.
        ``prefer`` scores free slots (e.g. prompt tokens already in a slot's
        cache); the highest wins, least recently used among equals.
        """
        slot = await self._take(retry_after_s, continuation, prefer)
        try:
            yield slot
        finally:
            self._give_back(slot)

    async def _take(
        self,
        retry_after_s: float,
        continuation: bool = False,
        prefer: Callable[[int], int] | None = None,
    ) -> int:
        if self._closed:
            raise Unavailable("the model is being unloaded", reason=Reason.MODEL_UNLOADING)
        if self._free and (continuation or not self.queue_depth):
            self._idle.clear()
            if prefer is None or len(self._free) == 1:
                return self._free.popleft()
            best = max(self._free, key=prefer)  # max keeps the first (LRU) of equals
            self._free.remove(best)
            return best
        if continuation and self._reserve:
            self._idle.clear()
            return self._reserve.popleft()
        if not continuation and self.queue_depth >= self.queue_limit:
            raise ResourceExhausted(
                f"all {self.total} slots are busy and the queue is full "
                f"({self.queue_limit} waiting); retry in {retry_after_s:.1f}s",
                reason=Reason.QUEUE_FULL,
                retry_after_s=retry_after_s,
            )
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (waiter, continuation)
        if continuation:
            # Behind earlier continuations, ahead of every ordinary request.
            position = sum(1 for _, cont in self._waiters if cont)
            self._waiters.insert(position, entry)
        else:
            self._waiters.append(entry)
        try:
            return await waiter
        except asyncio.CancelledError:
            # The caller went away while queued. If a slot was handed over in
            # the same instant, pass it on rather than leak it.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(waiter.result())
            raise
        finally:
            try:
                self._waiters.remove(entry)
            except ValueError:
                pass

    def _give_back(self, slot: int) -> None:
        reserved = slot >= self.total
        for waiter, continuation in self._waiters:
            if not waiter.done() and (continuation or not reserved):
                waiter.set_result(slot)
                return
        (self._reserve if reserved else self._free).append(slot)
        if len(self._free) == self.total and len(self._reserve) == self.reserved:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no slot is busy; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Refuse new requests and fail the queued ones."""
        self._closed = True
        for waiter, _ in self._waiters:
            if not waiter.done():
                waiter.set_exception(
                    Unavailable("the model is being unloaded", reason=Reason.MODEL_UNLOADING)
                )
