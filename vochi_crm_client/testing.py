"""Test helpers: a fake monotonic clock whose ``sleep`` wakes only when the clock is advanced.

Imported explicitly, never from ``vochi_crm_client`` itself::

    from vochi_crm_client.testing import FakeClock, seeded_rng, settle

    clock = FakeClock()                    # clock() -> 0.0
    cache = RefreshingCache(..., clock=clock, sleep=clock.sleep, rng=seeded_rng(1))
    clock.advance(30)                      # sync: moves time, wakes sleepers due by now
    await settle()                         # lets the woken tasks run
    await clock.run_for(300, step=1)       # advance in steps, settling after each one

Nothing here sleeps for real: ``settle`` only yields to the event loop (``asyncio.sleep(0)``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random

__all__ = ["FakeClock", "seeded_rng", "settle"]


async def settle(rounds: int = 50) -> None:
    """Yield to the event loop ``rounds`` times so ready tasks (and their follow-ups) run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def seeded_rng(seed: int = 0) -> random.Random:
    """A deterministic ``random.Random`` for jitter in tests."""
    return random.Random(seed)


class FakeClock:
    """A callable monotonic clock that only moves on ``advance``; ``sleep`` follows it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, sleepers={self.sleepers})"

    @property
    def now(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many tasks are suspended in ``sleep`` right now."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    @property
    def next_deadline(self) -> float | None:
        """When the earliest pending ``sleep`` ends, or None if nobody sleeps."""
        pending = [when for when, _, fut in self._sleepers if not fut.done()]
        return min(pending, default=None)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def sleep(self, seconds: float) -> None:
        """Suspend until the clock has been advanced by ``seconds`` (a checkpoint if <= 0)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), fut))
        await fut

    async def run_for(self, seconds: float, *, step: float = 1.0, rounds: int = 50) -> None:
        """Advance ``seconds`` in increments of ``step``, settling the loop after each one."""
        if step <= 0:
            raise ValueError("step must be > 0")
        target = self._now + seconds
        await settle(rounds)
        while self._now < target:
            self.advance(min(step, target - self._now))
            await settle(rounds)
