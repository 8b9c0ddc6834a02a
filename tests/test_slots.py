"""`_concurrency.Slots`, the run-wide call slots: never more holders than slots, first
come first served, and a cancelled waiter never keeps or loses a slot."""

from __future__ import annotations

import asyncio
import random

import pytest

from gra_async._concurrency import Slots


def test_waiters_get_slots_in_arrival_order() -> None:
    async def go() -> list[int]:
        slots = Slots(1)
        order: list[int] = []
        await slots.acquire()

        async def wait(i: int) -> None:
            async with slots:
                order.append(i)

        async with asyncio.TaskGroup() as group:
            for i in range(5):
                group.create_task(wait(i))
            await asyncio.sleep(0)
            slots.release()
        assert slots.free == 1
        return order

    assert asyncio.run(go()) == [0, 1, 2, 3, 4]


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def go() -> None:
        slots = Slots(1)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to `first`, which is cancelled before it runs
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)  # the slot went on to `second`
        assert slots.free == 0
        slots.release()
        assert slots.free == 1

    asyncio.run(go())


def test_under_random_cancellations_holders_never_exceed_slots_and_none_leak() -> None:
    async def go() -> None:
        slots = Slots(7)
        rng = random.Random(3)
        holding = peak = 0

        async def worker() -> None:
            nonlocal holding, peak
            async with slots:
                holding += 1
                peak = max(peak, holding)
                assert holding <= 7
                try:
                    await asyncio.sleep(rng.random() * 0.002)
                finally:
                    holding -= 1

        tasks = [asyncio.create_task(worker()) for _ in range(400)]
        for _ in range(120):
            await asyncio.sleep(rng.random() * 0.001)
            rng.choice(tasks).cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert peak == 7
        assert holding == 0
        assert slots.free == 7

    asyncio.run(go())
