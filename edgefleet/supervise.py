"""Each daemon's long-lived loops, supervised in one task group.

A loop that crashes is logged at once, with its traceback, and then, by a
decision made per loop when it is started, either restarted with backoff
(``restart=True``: a loop that can recover, such as a watch or a lease
keepalive) or the daemon is stopped and exits non-zero (``restart=False``: a
listener without which the daemon is useless). Leaving the ``async with``
cancels every loop and waits for them, so shutdown never leaves one behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("edgefleet.supervise")

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
# A loop that ran this long before crashing starts again from the short backoff.
HEALTHY_AFTER_S = 60.0


class Supervisor:
    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop  # set when a fatal loop crashes: the daemon shuts down
        self._group = asyncio.TaskGroup()
        self._tasks: list[asyncio.Task] = []
        self.failed: str | None = None  # the fatal loop that crashed, if any
        self.crashes: dict[str, int] = {}

    async def __aenter__(self) -> Supervisor:
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        for task in self._tasks:
            task.cancel()
        return await self._group.__aexit__(*exc_info)

    def start(self, name: str, loop: Callable[[], Awaitable[None]], *, restart: bool) -> None:
        """Run ``loop()`` until the supervisor closes; ``restart`` decides what a crash does."""
        task = self._group.create_task(self._guard(name, loop, restart), name=name)
        self._tasks.append(task)

    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]], restart: bool) -> None:
        backoff = INITIAL_BACKOFF_S
        clock = asyncio.get_running_loop()
        while True:
            started = clock.time()
            try:
                await loop()
                log.info("loop %s finished", name)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.crashes[name] = self.crashes.get(name, 0) + 1
                if not restart:
                    log.exception("loop %s crashed; stopping the daemon", name)
                    self.failed = self.failed or name
                    self._stop.set()
                    return
                if clock.time() - started >= HEALTHY_AFTER_S:
                    backoff = INITIAL_BACKOFF_S
                log.exception("loop %s crashed; restarting it in %.1fs", name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
