"""Pacing of RetailCRM requests per API key, below RetailCRM's own limits.

RetailCRM allows 10 requests/s per API key for ordinary methods and 40 requests/s for
``/telephony/*`` (separate buckets, burst 1) and answers 503 beyond that (retailcrm-api.md §1).
We schedule below it (8 and 32 by default): each key has two virtual-time buckets (GCRA), and
``acquire`` waits until the request's slot. When n service instances deliver, each takes 1/n of
the budget (``set_share``; the delivery workers count the live instances in PostgreSQL). A 503
or 429 halves the key's rate; the rate climbs back linearly over ``recovery_seconds`` after the
last penalty. Keys are held as digests, never as the secret itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
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


def is_telephony(method: str) -> bool:
    """Whether an API v5 method path counts against the telephony bucket."""
    return method.lstrip("/").removeprefix("api/v5/").startswith("telephony/")


def key_id(api_key: str) -> str:
    """A stable, non-secret name for an API key (for buckets and metrics)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


class _Bucket:
    __slots__ = ("tat",)

    def __init__(self) -> None:
        self.tat = float("-inf")

    def reserve(self, now: float, interval: float, burst: int) -> float:
        """Take the next slot; returns how long the caller must wait for it."""
        tat = max(self.tat, now)
        delay = max(0.0, tat - (burst - 1) * interval - now)
        self.tat = tat + interval
        return delay


class _KeyState:
    __slots__ = ("fraction", "general", "penalised_at", "penalties", "telephony")

    def __init__(self) -> None:
        self.general = _Bucket()
        self.telephony = _Bucket()
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
        """Take the next slot of the key's bucket for ``method``; returns the wait in seconds."""
        state = self._state(api_key)
        now = self._clock()
        fraction = self._fraction(state, now)
        if is_telephony(method):
            rate, bucket = self._config.telephony_rps, state.telephony
        else:
            rate, bucket = self._config.general_rps, state.general
        return bucket.reserve(now, 1.0 / (rate * fraction * self._share), self._config.burst)

    async def acquire(self, api_key: str, method: str) -> None:
        """Wait for the key's next slot for ``method``."""
        delay = self.reserve(api_key, method)
        if delay > 0:
            await self._sleep(delay)

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
            state = self._keys[name] = _KeyState()
        return state

    def _fraction(self, state: _KeyState, now: float) -> float:
        if state.fraction >= 1.0:
            return 1.0
        elapsed = max(0.0, now - state.penalised_at)
        recovered = (
            state.fraction + (1.0 - state.fraction) * elapsed / self._config.recovery_seconds
        )
        return min(1.0, recovered)
