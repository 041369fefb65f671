"""Capped exponential backoff with full jitter, as a pure function.

Public names (re-exported by ``vochi_crm_client``)::

    BackoffPolicy(*, base=0.5, cap=30.0, multiplier=2.0)      # frozen, validated
    ceiling(attempt: int, policy: BackoffPolicy) -> float     # the cap for this attempt, no jitter
    delay(attempt: int, policy: BackoffPolicy, rng: SupportsRandom) -> float
    parse_retry_after(value: str | None, *, cap=300.0, now=None) -> float | None

``attempt`` counts from 1 (the wait before the first retry). ``delay`` is uniform in
``[0, ceiling(attempt))`` ("full jitter"): it spreads retries of many clients evenly instead of
synchronising them. ``rng`` is anything with ``random() -> float``
(``random.Random(seed)`` in tests).

``parse_retry_after`` reads a server's ``Retry-After`` (RFC 9110 §10.2.3: delta-seconds, or an
HTTP-date): the seconds to wait, at most ``cap``; None when the header is absent or unusable
(anything but ASCII digits or a date, and a value too large to be finite). A date in the past
means 0. Every client of the system that honours ``Retry-After`` uses this one parser.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

__all__ = [
    "BackoffPolicy",
    "SupportsRandom",
    "ceiling",
    "delay",
    "parse_retry_after",
]

RETRY_AFTER_CAP: Final = 300.0
"""The longest ``Retry-After`` honoured by default: a longer one is a server's mistake."""


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


def parse_retry_after(
    value: str | None, *, cap: float = RETRY_AFTER_CAP, now: datetime | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, capped at ``cap``; None if unusable."""
    if not math.isfinite(cap) or cap < 0:
        raise ValueError(f"cap must be a finite number >= 0, got {cap!r}")
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit alone admits '²', which float() refuses
        seconds = float(value)  # a few hundred digits make inf: refused below
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            seconds = max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
        except OverflowError:
            return None
    if not math.isfinite(seconds):
        return None
    return min(seconds, cap)
