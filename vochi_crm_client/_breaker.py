"""A circuit breaker as a pure, synchronous state machine: time and randomness come in as values.

    CLOSED --(failure rate over the window, or N consecutive failures)--> OPEN
    OPEN --(jittered period elapsed; next acquire)--> HALF_OPEN
    HALF_OPEN --(probe_successes probes succeed)--> CLOSED
    HALF_OPEN --(a probe fails)--> OPEN, for longer than the last time

Every call hands out a ``Permit`` stamped with the breaker's generation, which changes on every
transition: outcomes of calls started before a transition are ignored, so a slow success that
started before the trip cannot close a breaker, nor a stale failure reopen a fresh one.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from vochi_crm_client._config import BreakerConfig

__all__ = ["Breaker", "BreakerState", "Permit"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True, eq=False)
class Permit:
    """Leave to make one call; settle it with ``record`` or ``release``, exactly once."""

    generation: int
    probe: bool
    issued_at: float


class Breaker:
    """The breaker of one target. Not thread-safe; one event loop owns it."""

    def __init__(self, config: BreakerConfig | None = None, *, rng: random.Random | None = None):
        self.config = config or BreakerConfig()
        self._rng = rng or random.Random()
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures_in_window = 0
        self._consecutive = 0
        self._trips = 0  # trips since the breaker last closed: the open period grows with it
        self._open_until = 0.0
        self._probes: set[Permit] = set()
        self._probe_successes = 0
        self.opened_total = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def open_until(self) -> float:
        return self._open_until

    @property
    def probes_in_flight(self) -> int:
        return len(self._probes)

    def acquire(self, now: float) -> Permit | None:
        """A permit to make a call now, or ``None`` while the breaker refuses calls."""
        if self._state is BreakerState.OPEN:
            if now < self._open_until:
                return None
            self._transition(BreakerState.HALF_OPEN)
        if self._state is BreakerState.CLOSED:
            return Permit(self._generation, False, now)
        self._reclaim_stale_probes(now)
        if len(self._probes) >= self.config.half_open_probes:
            return None
        permit = Permit(self._generation, True, now)
        self._probes.add(permit)
        return permit

    def record(self, permit: Permit, ok: bool, now: float) -> None:
        """Settle a permit with the outcome of its call."""
        self._probes.discard(permit)
        if permit.generation != self._generation:
            return
        if self._state is BreakerState.HALF_OPEN:
            if not ok:
                self._trip(now)
                return
            self._probe_successes += 1
            if self._probe_successes >= self.config.probe_successes:
                self._trips = 0
                self._transition(BreakerState.CLOSED)
            return
        self._record_closed(ok, now)

    def release(self, permit: Permit) -> None:
        """Settle a permit whose call never completed (cancelled): it frees its probe slot."""
        self._probes.discard(permit)

    def retry_in(self, now: float) -> float:
        """Seconds until ``acquire`` may succeed again (0 when it may now)."""
        if self._state is BreakerState.OPEN:
            return max(0.0, self._open_until - now)
        if (
            self._state is BreakerState.HALF_OPEN
            and len(self._probes) >= self.config.half_open_probes
        ):
            oldest = min(p.issued_at for p in self._probes)
            return max(0.0, oldest + self.config.probe_timeout - now)
        return 0.0

    def stats(self) -> dict[str, Any]:
        window = len(self._outcomes)
        return {
            "state": self._state.value,
            "opened_total": self.opened_total,
            "trips": self._trips,
            "window_calls": window,
            "window_failure_rate": round(self._failures_in_window / window, 4) if window else 0.0,
            "consecutive_failures": self._consecutive,
            "probes_in_flight": len(self._probes),
        }

    def _record_closed(self, ok: bool, now: float) -> None:
        self._outcomes.append((now, ok))
        if not ok:
            self._failures_in_window += 1
        self._consecutive = 0 if ok else self._consecutive + 1
        self._evict(now)
        cfg = self.config
        calls = len(self._outcomes)
        if self._consecutive >= cfg.consecutive_failures or (
            calls >= cfg.min_calls and self._failures_in_window >= cfg.failure_rate * calls
        ):
            self._trip(now)

    def _evict(self, now: float) -> None:
        horizon = now - self.config.window
        while self._outcomes and self._outcomes[0][0] <= horizon:
            _, ok = self._outcomes.popleft()
            if not ok:
                self._failures_in_window -= 1

    def _trip(self, now: float) -> None:
        cfg = self.config
        self._trips += 1
        self.opened_total += 1
        period = min(cfg.open_max, cfg.open_base * 2 ** min(self._trips - 1, 62))
        period *= 1.0 - cfg.open_jitter * self._rng.random()
        self._open_until = now + period
        self._transition(BreakerState.OPEN)

    def _reclaim_stale_probes(self, now: float) -> None:
        timeout = self.config.probe_timeout
        stale = [p for p in self._probes if now - p.issued_at >= timeout]
        for permit in stale:
            self._probes.discard(permit)

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._outcomes.clear()
        self._failures_in_window = 0
        self._consecutive = 0
        self._probes.clear()
        self._probe_successes = 0
