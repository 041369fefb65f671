"""The FakeClock of vochi_crm_client.testing: time moves only when the test says so."""

from __future__ import annotations

import asyncio

import pytest

from vochi_crm_client.testing import FakeClock, seeded_rng, settle


async def test_sleep_wakes_only_once_the_clock_reaches_its_deadline() -> None:
    clock = FakeClock(start=100.0)
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(5)
        woke.append(clock())

    task = asyncio.get_running_loop().create_task(sleeper())
    await settle()
    clock.advance(4.9)
    await settle()
    assert woke == []
    clock.advance(0.1)
    await settle()
    assert woke == [105.0]
    await task


async def test_sleepers_wake_in_deadline_order() -> None:
    clock = FakeClock()
    order: list[int] = []

    async def sleeper(seconds: int) -> None:
        await clock.sleep(seconds)
        order.append(seconds)

    tasks = [asyncio.get_running_loop().create_task(sleeper(s)) for s in (3, 1, 2)]
    await settle()
    assert clock.sleepers == 3
    assert clock.next_deadline == 1
    clock.advance(10)
    await asyncio.gather(*tasks)
    assert order == [1, 2, 3]


async def test_cancelled_sleeper_is_forgotten() -> None:
    clock = FakeClock()
    task = asyncio.get_running_loop().create_task(clock.sleep(1))
    await settle()
    task.cancel()
    await settle()
    assert clock.sleepers == 0
    clock.advance(2)
    assert task.cancelled()


async def test_run_for_lets_a_periodic_loop_tick_every_step() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def loop() -> None:
        while True:
            await clock.sleep(10)
            ticks.append(clock())

    task = asyncio.get_running_loop().create_task(loop())
    await clock.run_for(35, step=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ticks == [10.0, 20.0, 30.0]


async def test_zero_sleep_is_a_checkpoint_not_a_wait() -> None:
    clock = FakeClock()
    await asyncio.wait_for(clock.sleep(0), timeout=1)
    assert clock() == 0.0


def test_clock_never_goes_back() -> None:
    with pytest.raises(ValueError, match="never goes back"):
        FakeClock().advance(-1)


def test_seeded_rng_is_deterministic() -> None:
    assert seeded_rng(3).random() == seeded_rng(3).random()
