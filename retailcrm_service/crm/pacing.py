"""Pacing of RetailCRM requests per API key, below RetailCRM's own limits.

RetailCRM allows 10 requests/s per API key for ordinary methods and 40 requests/s for
``/telephony/*`` (separate buckets, burst 1) and answers 503 beyond that
(docs/retailcrm.md#rate-limits).
We schedule below it (8 and 32 by default): each key has two virtual-time buckets (GCRA), and
``acquire`` waits until the request's slot. When n service instances deliver, each takes 1/n of
the budget (``set_share``; the delivery workers count the live instances in PostgreSQL). A 503
or 429 halves the key's rate; the rate climbs back linearly over ``recovery_seconds`` after the
last penalty. Keys are held as digests, never as the secret itself.

Two lanes share each bucket. Smart redirect's lookups are on the real-time path of an incoming
call (the dialplan waits at most ~300 ms), delivery is durable and can wait: ``acquire(...,
interactive=True)`` waiters get the bucket's next slot before any ordinary waiter, but only up to
``interactive_share`` of the slots while ordinary waiters queue (with the default 0.5, at most one
interactive grant in a row passes a waiting ordinary one). So a lookup waits at most about two
slot intervals however much delivery is queued on the same key, and however many lookups arrive,
delivery keeps at least the rest of the key's budget: a flood of distinct callers cannot stall a
key's delivery until its leases lapse. Slots are only taken when granted (waiters queue, nobody
reserves the future), so both lanes together never exceed the bucket's rate, and a cancelled
waiter (a lookup past its deadline) leaves nothing behind. With no waiter in the other lane,
either lane gets the whole budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PacingConfig:
    """Rates per API key; defaults stay 20 % under RetailCRM's limits."""

    general_rps: float = 8.0
    telephony_rps: float = 32.0
    burst: int = 1
    slowdown_factor: float = 0.5
    min_fraction: float = 0.125
    recovery_seconds: float = 10.0
    interactive_share: float = 0.5

    def __post_init__(self) -> None:
        if self.general_rps <= 0 or self.telephony_rps <= 0:
            raise ValueError("rates must be positive")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if not 0 < self.slowdown_factor < 1:
            raise ValueError("slowdown_factor must be in (0, 1)")
        if not 0 < self.min_fraction <= 1:
            raise ValueError("min_fraction must be in (0, 1]")
        if self.recovery_seconds <= 0:
            raise ValueError("recovery_seconds must be positive")
        if not 0 < self.interactive_share <= 1:
            raise ValueError("interactive_share must be in (0, 1]")

    @property
    def interactive_streak(self) -> int:
        """Interactive grants allowed in a row while ordinary waiters queue (share k/(k+1))."""
        if self.interactive_share >= 1:
            return 1 << 62
        return max(1, int(self.interactive_share / (1 - self.interactive_share) + 1e-9))


def is_telephony(method: str) -> bool:
    """Whether an API v5 method path counts against the telephony bucket."""
    return method.lstrip("/").removeprefix("api/v5/").startswith("telephony/")


def key_id(api_key: str) -> str:
    """A stable, non-secret name for an API key (for buckets and metrics)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


# A wait this short is a float rounding artefact, not a real one (1 ns, far below any interval).
_EPSILON = 1e-9


class _Bucket:
    """One GCRA bucket and its waiters: interactive first (up to ``max_streak`` grants in a row
    while ordinary waiters queue), then ordinary, each in FIFO order."""

    __slots__ = ("interactive", "max_streak", "ordinary", "streak", "tat")

    def __init__(self, max_streak: int) -> None:
        self.tat = float("-inf")
        self.interactive: deque[asyncio.Event] = deque()
        self.ordinary: deque[asyncio.Event] = deque()
        self.max_streak = max_streak
        self.streak = 0  # interactive grants since the last ordinary one, while ordinary waited

    def wait_for_slot(self, now: float, interval: float, burst: int) -> float:
        """How long until the next slot is free (0 when it is free now); takes nothing."""
        return max(0.0, max(self.tat, now) - (burst - 1) * interval - now)

    def take(self, now: float, interval: float) -> None:
        self.tat = max(self.tat, now) + interval

    def reserve(self, now: float, interval: float, burst: int) -> float:
        """Take the next slot; returns how long the caller must wait for it."""
        delay = self.wait_for_slot(now, interval, burst)
        self.take(now, interval)
        return delay

    def may_go(self, waiter: asyncio.Event | None, interactive: bool) -> bool:
        """Whether ``waiter`` (None: a newcomer) is first in line for the next slot."""
        queue = self.interactive if interactive else self.ordinary
        first = queue[0] if queue else None
        if first is not waiter:
            return False
        if interactive:
            return not self.ordinary or self.streak < self.max_streak
        return not self.interactive or self.streak >= self.max_streak

    def granted(self, interactive: bool) -> None:
        """Count a grant for the lanes' shares."""
        if not interactive:
            self.streak = 0
        elif self.ordinary:
            self.streak += 1

    def wake(self) -> None:
        """The line moved (a grant, a cancellation): let the first of each lane look again."""
        for queue in (self.interactive, self.ordinary):
            if queue:
                queue[0].set()


class _KeyState:
    __slots__ = ("fraction", "general", "penalised_at", "penalties", "telephony")

    def __init__(self, max_streak: int) -> None:
        self.general = _Bucket(max_streak)
        self.telephony = _Bucket(max_streak)
        self.fraction = 1.0
        self.penalised_at = float("-inf")
        self.penalties = 0


class Pacer:
    """Token buckets per API key; ``await acquire(key, method)`` before every request."""

    def __init__(
        self,
        *,
        config: PacingConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._config = config or PacingConfig()
        self._clock = clock
        self._sleep = sleep
        self._keys: dict[str, _KeyState] = {}
        self._share = 1.0

    @property
    def share(self) -> float:
        return self._share

    def set_share(self, share: float) -> None:
        """This process's part of every key's budget (``1/n`` when n instances deliver)."""
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self._share = share

    def reserve(self, api_key: str, method: str) -> float:
        """Take the next slot of the key's bucket for ``method`` at once; returns the wait.

        Outside the lanes (it does not queue); the pacing callers use ``acquire``.
        """
        state = self._state(api_key)
        bucket = self._bucket(state, method)
        now = self._clock()
        return bucket.reserve(now, self._interval(state, method, now), self._config.burst)

    async def acquire(self, api_key: str, method: str, *, interactive: bool = False) -> None:
        """Wait for the key's next slot for ``method``.

        ``interactive`` waiters (real-time lookups) are served before ordinary ones (delivery).
        Cancelling a waiter gives up its place; no slot is taken unless granted.
        """
        state = self._state(api_key)
        bucket = self._bucket(state, method)
        if bucket.may_go(None, interactive) and self._try_take(state, bucket, method) <= 0:
            bucket.granted(interactive)
            return
        waiter = asyncio.Event()
        queue = bucket.interactive if interactive else bucket.ordinary
        queue.append(waiter)
        try:
            while True:
                waiter.clear()
                if not bucket.may_go(waiter, interactive):
                    await waiter.wait()
                    continue
                delay = self._try_take(state, bucket, method)
                if delay <= 0:
                    queue.popleft()
                    bucket.granted(interactive)
                    return
                await self._sleep(delay)
        finally:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)  # cancelled before its turn
            bucket.wake()

    def penalise(self, api_key: str) -> None:
        """RetailCRM said 503/429 for this key: slow it down."""
        state = self._state(api_key)
        now = self._clock()
        current = self._fraction(state, now)
        state.fraction = max(self._config.min_fraction, current * self._config.slowdown_factor)
        state.penalised_at = now
        state.penalties += 1

    def rate_fraction(self, api_key: str) -> float:
        """The share of the configured rates the key currently gets (1.0 = full speed)."""
        return self._fraction(self._state(api_key), self._clock())

    def stats(self) -> dict[str, dict[str, float | int]]:
        now = self._clock()
        return {
            name: {"rate_fraction": round(self._fraction(s, now), 3), "penalties": s.penalties}
            for name, s in self._keys.items()
        }

    def _state(self, api_key: str) -> _KeyState:
        name = key_id(api_key)
        state = self._keys.get(name)
        if state is None:
            state = self._keys[name] = _KeyState(self._config.interactive_streak)
        return state

    def _bucket(self, state: _KeyState, method: str) -> _Bucket:
        return state.telephony if is_telephony(method) else state.general

    def _interval(self, state: _KeyState, method: str, now: float) -> float:
        rate = self._config.telephony_rps if is_telephony(method) else self._config.general_rps
        return 1.0 / (rate * self._fraction(state, now) * self._share)

    def _try_take(self, state: _KeyState, bucket: _Bucket, method: str) -> float:
        """Take the slot if it is free now (returns 0), else return how long until it is."""
        now = self._clock()
        interval = self._interval(state, method, now)
        delay = bucket.wait_for_slot(now, interval, self._config.burst)
        if delay <= _EPSILON:
            bucket.take(now, interval)
            return 0.0
        return delay

    def _fraction(self, state: _KeyState, now: float) -> float:
        if state.fraction >= 1.0:
            return 1.0
        elapsed = max(0.0, now - state.penalised_at)
        recovered = (
            state.fraction + (1.0 - state.fraction) * elapsed / self._config.recovery_seconds
        )
        return min(1.0, recovered)
