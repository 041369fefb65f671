"""Frozen, validated tunables of the dispatcher and its circuit breaker (production defaults)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BreakerConfig", "DispatchConfig"]


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """When a target's breaker opens, how long it stays open, and how it probes its way back.

    It opens when, over the last ``window`` seconds and at least ``min_calls`` calls, the failure
    rate reaches ``failure_rate``, or after ``consecutive_failures`` failures in a row. It stays
    open ``open_base * 2**(trips-1)`` seconds (capped at ``open_max``, shortened by up to
    ``open_jitter`` at random so that many clients do not probe in step), then admits at most
    ``half_open_probes`` probes at once and closes after ``probe_successes`` of them succeed. A
    probe slot not settled within ``probe_timeout`` is reclaimed.
    """

    window: float = 30.0
    min_calls: int = 10
    failure_rate: float = 0.5
    consecutive_failures: int = 5
    open_base: float = 2.0
    open_max: float = 60.0
    open_jitter: float = 0.25
    half_open_probes: int = 2
    probe_successes: int = 2
    probe_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("window", "open_base", "open_max", "probe_timeout"):
            _positive(name, getattr(self, name))
        for name in ("min_calls", "consecutive_failures", "half_open_probes", "probe_successes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        _fraction("failure_rate", self.failure_rate)
        _fraction("open_jitter", self.open_jitter)
        if self.open_max < self.open_base:
            raise ValueError("open_max must be >= open_base")


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchConfig:
    """Batching, retries and buffering of the per-target senders.

    - batching: up to ``batch_max`` events (and ``batch_max_bytes``) per POST, waiting at most
      ``linger`` seconds for a batch to fill; ``max_in_flight`` POSTs at once per target, over as
      many keep-alive connections;
    - retries: each attempt is cut at ``attempt_timeout``; up to ``retries`` more attempts with full
      jitter backoff between ``backoff_base`` and ``backoff_max``; a ``Retry-After`` is honoured up
      to ``retry_after_max``. A batch still failing goes back to the front of its queue;
    - buffering: at most ``max_queue`` events per target; popups expire after ``popup_ttl``
      and are superseded by their call's hangup once late (the target failing, or the popup
      waiting ``supersede_after`` seconds); ``pending_max`` events may wait for the matrix to
      learn about their enterprise;
    - shutdown: leaving the client flushes for at most ``drain_timeout`` seconds.
    """

    batch_max: int = 100
    batch_max_bytes: int = 512 * 1024
    linger: float = 0.005
    max_in_flight: int = 4
    attempt_timeout: float = 2.5
    retries: int = 2
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    retry_after_max: float = 30.0
    max_queue: int = 50_000
    popup_ttl: float = 30.0
    supersede_after: float = 1.0
    pending_max: int = 10_000
    drain_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("batch_max", "batch_max_bytes", "max_in_flight", "max_queue", "pending_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("attempt_timeout", "backoff_base", "backoff_max", "popup_ttl"):
            _positive(name, getattr(self, name))
        for name in ("linger", "retry_after_max", "drain_timeout", "supersede_after"):
            _non_negative(name, getattr(self, name))
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be >= backoff_base")
