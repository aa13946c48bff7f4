"""A stall of the coordinator's own event loop must not evict its nodes.

In-process against a real etcd: a Membership serves one node's heartbeat
stream, and the test blocks the event loop (time.sleep) for longer than the
node's lease TTL, as a long computation or a swap storm would.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.etcd import Etcd
from coordinator.fleet import FleetView
from coordinator.keys import Keys
from coordinator.loop_watch import LeaseKeeper, LoopClock
from coordinator.membership import Membership
from edgefleet.v1 import common_pb2, coordinator_pb2

LEASE_TTL_S = 1.0
STALL_S = 3.0


def test_the_clock_measures_a_stall_of_its_loop():
    async def scenario():
        lags = []
        clock = LoopClock(observe=lags.append)
        ticking = asyncio.create_task(clock.run())
        await asyncio.sleep(0.3)
        before = time.monotonic()
        assert clock.stalled_since(before) == 0.0
        time.sleep(0.8)  # noqa: ASYNC251 -- the stall under test
        # Asked at once, before the clock ticked again: the stall still counts.
        assert clock.stalled_since(before) >= 0.5
        await asyncio.sleep(0.3)
        assert clock.stalled_since(before) >= 0.5 and max(lags) >= 0.5
        assert clock.stalled_since(time.monotonic()) == 0.0
        ticking.cancel()

    asyncio.run(scenario())


async def _serve_one_node(endpoints: list[str], *, guarded: bool) -> tuple[bool, bool]:
    """Register a node, heartbeat it, stall the loop; (lease alive, stream alive)."""
    etcd = Etcd(endpoints)
    await etcd.connect()
    keys = Keys()
    fleet = FleetView(etcd, keys)
    clock = LoopClock()
    tasks = [asyncio.create_task(fleet.run()), asyncio.create_task(clock.run())]
    membership = Membership(
        etcd,
        keys,
        fleet,
        coordinator_id="c1",
        lease_ttl_s=LEASE_TTL_S,
        heartbeat_interval_s=0.2,
        clock=clock if guarded else None,
    )
    keeper = LeaseKeeper(
        clock, membership.live_leases, lambda: Etcd(endpoints), lease_ttl_s=LEASE_TTL_S
    )
    if guarded:
        keeper.start()
    try:
        registered = await membership.register(
            coordinator_pb2.RegisterRequest(
                node_id="n1",
                address="127.0.0.1:1",
                models=["m"],
                capacity=common_pb2.Capacity(slots_total=1, slots_free=1),
            )
        )
        stop = asyncio.Event()

        async def beats():
            while not stop.is_set():
                yield coordinator_pb2.HeartbeatRequest(
                    node_id="n1",
                    epoch=registered.epoch,
                    capacity=common_pb2.Capacity(slots_total=1, slots_free=1),
                )
                await asyncio.sleep(0.2)

        ended = asyncio.Event()

        async def stream():
            async for _ in membership.heartbeats(beats()):
                pass
            ended.set()

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(1.0)  # steady heartbeats; the keeper takes its snapshot
        time.sleep(STALL_S)  # noqa: ASYNC251 -- the stall under test: three lease TTLs
        await asyncio.sleep(1.5)  # the loop runs again; heartbeats resume
        alive = await etcd.get(keys.node("n1")) is not None
        stream_alive = not ended.is_set()
        stop.set()
        streaming.cancel()
        return alive, stream_alive
    finally:
        keeper.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await etcd.close()


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_a_stall_of_the_coordinators_own_loop_evicts_no_node(etcd_cluster, guarded):
    alive, stream_alive = asyncio.run(_serve_one_node(etcd_cluster.endpoints, guarded=guarded))
    if guarded:
        assert alive and stream_alive
    else:
        # Without the guards (what the coordinator did before): the node is lost.
        assert not (alive and stream_alive)
