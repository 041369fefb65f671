"""Per-key request limits: at most N accepted requests inside any window of one second.

The GO client paces itself with token buckets (10 rps, 40 rps for ``/telephony``, burst 1); the
server side is only known as "more than 10 requests in a second -> 503". A sliding window states
exactly that: the 11th request inside one second is refused, whatever the spacing, while a paced
client (one request per 1/N s) is never refused. Refused requests do not count.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

_EPSILON = 1e-6  # absorbs float error, so a client paced at exactly N per second passes


class SlidingWindowLimiter:
    """Sliding-window counters keyed by (API key, bucket name)."""

    def __init__(
        self,
        *,
        limits: dict[str, int],
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = dict(limits)
        self._window = window
        self._clock = clock
        self._hits: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, bucket: str) -> bool:
        """Count one request unless the window is full; False means "answer 503"."""
        limit = self._limits[bucket]
        with self._lock:
            now = self._clock()
            hits = self._hits.setdefault((key, bucket), deque())
            while hits and hits[0] <= now - self._window + _EPSILON:
                hits.popleft()
            if len(hits) >= limit:
                return False
            hits.append(now)
            return True

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()
