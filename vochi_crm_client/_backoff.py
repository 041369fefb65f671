"""Capped exponential backoff with full jitter, as a pure function.

Public names (re-exported by ``vochi_crm_client``)::

    BackoffPolicy(*, base=0.5, cap=30.0, multiplier=2.0)      # frozen, validated
    ceiling(attempt: int, policy: BackoffPolicy) -> float     # the cap for this attempt, no jitter
    delay(attempt: int, policy: BackoffPolicy, rng: SupportsRandom) -> float

``attempt`` counts from 1 (the wait before the first retry). ``delay`` is uniform in
``[0, ceiling(attempt))`` ("full jitter"): it spreads retries of many clients evenly instead of
synchronising them. ``rng`` is anything with ``random() -> float``
(``random.Random(seed)`` in tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

__all__ = ["BackoffPolicy", "SupportsRandom", "ceiling", "delay"]


class SupportsRandom(Protocol):
    """The part of ``random.Random`` the library uses."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffPolicy:
    """Wait before retry ``n``: ``min(cap, base * multiplier ** (n - 1))``, then jittered."""

    base: float = 0.5
    cap: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        for name in ("base", "cap", "multiplier"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"BackoffPolicy.{name} must be a finite number, got {value!r}")
        if self.base <= 0:
            raise ValueError(f"BackoffPolicy.base must be > 0, got {self.base!r}")
        if self.cap < self.base:
            raise ValueError(f"BackoffPolicy.cap must be >= base, got {self.cap!r}")
        if self.multiplier < 1:
            raise ValueError(f"BackoffPolicy.multiplier must be >= 1, got {self.multiplier!r}")


def ceiling(attempt: int, policy: BackoffPolicy) -> float:
    """The largest wait before retry number ``attempt`` (1-based), before jitter."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt!r}")
    if policy.multiplier == 1:
        return policy.base
    # Past this exponent the cap applies anyway; stopping here avoids float overflow.
    limit = math.log(policy.cap / policy.base, policy.multiplier) + 1
    if attempt - 1 >= limit:
        return policy.cap
    return min(policy.cap, policy.base * policy.multiplier ** (attempt - 1))


def delay(attempt: int, policy: BackoffPolicy, rng: SupportsRandom) -> float:
    """Full-jitter wait before retry number ``attempt``: uniform in ``[0, ceiling(attempt))``."""
    return rng.random() * ceiling(attempt, policy)
