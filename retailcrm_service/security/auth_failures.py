"""Failed clientId authentications, per source: a bound on guessing and on the log lines it makes.

RetailCRM's callbacks (``/retailcrm/make-call``, ``/retailcrm/status``) and the ``clientId`` login
of the admin page authenticate a caller by the module's ``clientId``. Every unknown one is counted
against its source address (``caller_address``: nginx's ``X-Real-IP``). A source with ``limit``
failures within ``window`` seconds gets 429 with Retry-After for every further unknown clientId
until its window ends; those are neither counted again nor logged. A known clientId is still
served from that address: RetailCRM's callbacks may share it (a proxy in front of nginx), and a
clientId is a long random secret, so refusing it would cost more than it protects. The state is a
bounded TTL cache (``max_sources``): a flood of sources evicts the oldest instead of growing.

A failure is logged as one warning line per ``log_interval`` at most, carrying the count of the
failures it stands for, so a flood of junk clientIds cannot flood the log. The clientId itself is
never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Window:
    started: float
    failures: int


class AuthFailures:
    """Per-source failure windows and a rate-limited warning (see the module docstring)."""

    def __init__(
        self,
        *,
        limit: int = 20,
        window: float = 60.0,
        max_sources: int = 10_000,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0 or max_sources < 1 or log_interval < 0:
            raise ValueError("limit and max_sources >= 1, window > 0, log_interval >= 0")
        self.limit = limit
        self.window = window
        self.log_interval = log_interval
        self._clock = clock
        self._windows: TTLCache[str, _Window] = TTLCache(max_sources, window, timer=clock)
        self._next_log = -float("inf")
        self._unlogged = 0
        self.failures = 0
        self.refused = 0

    def retry_after(self, source: str | None) -> float:
        """0.0 when ``source`` may try, else the seconds until its window ends."""
        found = self._windows.get(source or "")
        if found is None or found.failures < self.limit:
            return 0.0
        self.refused += 1
        return max(0.0, found.started + self.window - self._clock())

    def failed(self, source: str | None, what: str) -> None:
        """Count one failed authentication of ``source`` (``what``: which route, for the log)."""
        key = source or ""
        self.failures += 1
        found = self._windows.get(key)
        if found is None:
            self._windows[key] = _Window(self._clock(), 1)
        else:
            found.failures += 1
        self._unlogged += 1
        now = self._clock()
        if now >= self._next_log:
            logger.warning(
                "auth.unknown_client_id what=%s source=%s failures=%d",
                what,
                source or "-",
                self._unlogged,
            )
            self._unlogged = 0
            self._next_log = now + self.log_interval

    def stats(self) -> dict[str, Any]:
        return {
            "failures": self.failures,
            "refused": self.refused,
            "sources": len(self._windows),
        }
