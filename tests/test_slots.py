"""Admission control: slots, bounded queue, cancellation (in-process, asyncio)."""

import asyncio

import pytest

from edgefleet.errors import ResourceExhausted, Unavailable
from node_agent.slots import SlotPool


def run(coro):
    return asyncio.run(coro)


def test_full_queue_is_refused_at_once_and_slots_are_returned():
    async def scenario():
        pool = SlotPool(slots=2, queue_limit=1)
        release = asyncio.Event()
        held = []

        async def hold():
            async with pool.acquire() as slot:
                held.append(slot)
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(3)]  # 2 run, 1 queues
        await asyncio.sleep(0.01)
        assert sorted(held) == [0, 1] and pool.queue_depth == 1
        with pytest.raises(ResourceExhausted) as refused:
            async with pool.acquire():
                pass
        assert refused.value.retry_after_s is not None
        release.set()
        await asyncio.gather(*holders)
        assert pool.free == 2 and pool.queue_depth == 0

    run(scenario())


def test_cancelled_waiter_leaves_the_queue_and_leaks_nothing():
    async def scenario():
        pool = SlotPool(slots=1, queue_limit=1)
        async with pool.acquire():
            waiter = asyncio.create_task(pool.acquire().__aenter__())
            await asyncio.sleep(0.01)
            assert pool.queue_depth == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert pool.queue_depth == 0
        assert pool.free == 1
        async with pool.acquire() as slot:
            assert slot == 0

    run(scenario())


def test_close_fails_queued_requests_and_refuses_new_ones():
    async def scenario():
        pool = SlotPool(slots=1, queue_limit=2)
        async with pool.acquire():
            waiter = asyncio.create_task(pool.acquire().__aenter__())
            await asyncio.sleep(0.01)
            pool.close()
            with pytest.raises(Unavailable):
                await waiter
        with pytest.raises(Unavailable):
            async with pool.acquire():
                pass

    run(scenario())


def test_wait_idle():
    async def scenario():
        pool = SlotPool(slots=1, queue_limit=0)
        assert await pool.wait_idle(0.01)
        async with pool.acquire():
            assert not await pool.wait_idle(0.01)
        assert await pool.wait_idle(0.01)

    run(scenario())


def test_a_continued_reply_goes_to_the_head_of_the_queue():
    async def scenario():
        pool = SlotPool(slots=1, queue_limit=3)
        order = []

        async def wait(name, first):
            async with pool.acquire(continuation=first):
                order.append(name)

        async with pool.acquire():
            tasks = [asyncio.create_task(wait("a", False)), asyncio.create_task(wait("b", False))]
            await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(wait("continued", True)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == ["continued", "a", "b"]

    run(scenario())


def test_reserved_slots_take_continued_replies_only():
    async def scenario():
        pool = SlotPool(slots=1, queue_limit=0, reserved=1)
        async with pool.acquire() as ordinary:
            assert ordinary == 0 and not pool.would_queue(continuation=True)
            # An ordinary request finds the node full (no queue room)...
            with pytest.raises(ResourceExhausted):
                async with pool.acquire():
                    pass
            # ...a continued reply takes the reserved slot at once.
            async with pool.acquire(continuation=True) as reserved:
                assert reserved == 1 and pool.reserve_free == 0
                # A second continuation waits (the queue limit does not refuse it)
                # and gets the first slot to come back, reserved or not.
                second = asyncio.create_task(_hold(pool, continuation=True))
                await asyncio.sleep(0.01)
                assert pool.queue_depth == 1
            assert await second == 1
        assert pool.free == 1 and pool.reserve_free == 1
        assert await pool.wait_idle(0.01)

    run(scenario())


def test_a_reserved_slot_coming_back_is_not_given_to_an_ordinary_request():
    async def scenario():
        pool = SlotPool(slots=1, queue_limit=2, reserved=1)
        async with pool.acquire():
            held = asyncio.Event()
            release = asyncio.Event()

            async def continued():
                async with pool.acquire(continuation=True):
                    held.set()
                    await release.wait()

            task = asyncio.create_task(continued())
            await held.wait()
            ordinary = asyncio.create_task(_hold(pool))
            await asyncio.sleep(0.01)
            release.set()
            await task
            await asyncio.sleep(0.01)
            assert not ordinary.done() and pool.reserve_free == 1
        assert await ordinary == 0

    run(scenario())


async def _hold(pool, *, continuation=False):
    async with pool.acquire(continuation=continuation) as slot:
        return slot


def test_a_slot_counts_when_it_holds_a_long_prefix_or_most_of_the_prompt():
    from node_agent.node import slot_value

    assert slot_value(shared=39, prompt_tokens=40) == 39  # a short prompt, repeated
    assert slot_value(shared=20, prompt_tokens=40) == 20  # half of it: a shared system prompt
    assert slot_value(shared=300, prompt_tokens=2000) == 300  # a conversation's history
    # The template's opening, shared by every prompt: no reason to evict that slot.
    assert slot_value(shared=3, prompt_tokens=40) == 0
    assert slot_value(shared=30, prompt_tokens=2000) == 0
