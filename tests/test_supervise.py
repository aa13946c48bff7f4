"""The daemons' loop supervisor: crashes are logged at once, then restarted or fatal."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edgefleet import supervise
from edgefleet.supervise import Supervisor


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(supervise, "INITIAL_BACKOFF_S", 0.01)


def test_a_crashing_loop_is_logged_and_restarted(caplog):
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.Event().wait()  # healthy from the third run on

    async def main() -> Supervisor:
        stop = asyncio.Event()
        async with Supervisor(stop) as loops:
            loops.start("flaky", flaky, restart=True)
            for _ in range(200):
                if len(runs) >= 3:
                    break
                await asyncio.sleep(0.01)
        assert not stop.is_set()
        return loops

    with caplog.at_level(logging.ERROR, logger="edgefleet.supervise"):
        loops = asyncio.run(main())
    assert len(runs) == 3 and loops.crashes == {"flaky": 2} and loops.failed is None
    crashes = [r for r in caplog.records if "loop flaky crashed" in r.getMessage()]
    assert len(crashes) == 2 and all(r.exc_info for r in crashes)  # with the traceback


def test_a_fatal_loop_stops_the_daemon_and_is_named():
    async def dies() -> None:
        raise OSError("listener gone")

    async def forever() -> None:
        await asyncio.Event().wait()

    async def main() -> tuple[Supervisor, bool]:
        stop = asyncio.Event()
        async with Supervisor(stop) as loops:
            loops.start("steady", forever, restart=True)
            loops.start("http", dies, restart=False)
            await asyncio.wait_for(stop.wait(), 5)
        return loops, stop.is_set()

    loops, stopped = asyncio.run(main())
    assert stopped and loops.failed == "http"


def test_leaving_cancels_every_loop():
    cancelled = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def main() -> None:
        async with Supervisor(asyncio.Event()) as loops:
            loops.start("a", lambda: forever("a"), restart=True)
            loops.start("b", lambda: forever("b"), restart=False)
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sorted(cancelled) == ["a", "b"]
