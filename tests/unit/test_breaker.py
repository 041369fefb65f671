"""The circuit breaker: each transition by example, and a Hypothesis state machine vs a model."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from vochi_crm_client._breaker import Breaker, BreakerState, Permit
from vochi_crm_client._config import BreakerConfig

SMALL = BreakerConfig(
    window=10.0,
    min_calls=4,
    failure_rate=0.5,
    consecutive_failures=3,
    open_base=1.0,
    open_max=8.0,
    open_jitter=0.5,
    half_open_probes=2,
    probe_successes=2,
    probe_timeout=5.0,
)


def _fail(b: Breaker, now: float) -> None:
    permit = b.acquire(now)
    assert permit is not None
    b.record(permit, False, now)


def _succeed(b: Breaker, now: float) -> None:
    permit = b.acquire(now)
    assert permit is not None
    b.record(permit, True, now)


def test_opens_after_consecutive_failures_and_refuses_calls() -> None:
    b = Breaker(SMALL, rng=random.Random(1))
    for _ in range(3):
        _fail(b, 0.0)
    assert b.state is BreakerState.OPEN
    assert b.acquire(0.1) is None
    assert 0.5 <= b.retry_in(0.0) <= 1.0


def test_opens_on_failure_rate_only_after_min_calls() -> None:
    b = Breaker(SMALL, rng=random.Random(1))
    _fail(b, 0.0)
    _succeed(b, 0.0)
    _fail(b, 0.0)
    assert b.state is BreakerState.CLOSED  # 2/3 failed, but fewer than min_calls
    _succeed(b, 0.0)
    assert b.state is BreakerState.OPEN  # 2/4 failed = the threshold


def test_failures_older_than_the_window_do_not_count() -> None:
    b = Breaker(SMALL, rng=random.Random(1))
    _fail(b, 0.0)
    _fail(b, 0.0)
    for t in (11.0, 11.0, 11.0):
        _succeed(b, t)
    _fail(b, 11.0)
    assert b.state is BreakerState.CLOSED  # 1/4 in the window


def test_half_open_admits_bounded_probes_and_closes_after_successes() -> None:
    b = Breaker(SMALL, rng=random.Random(1))
    for _ in range(3):
        _fail(b, 0.0)
    now = b.open_until
    p1, p2 = b.acquire(now), b.acquire(now)
    assert p1 is not None
    assert p2 is not None
    assert p1.probe
    assert p2.probe
    assert b.state is BreakerState.HALF_OPEN
    assert b.acquire(now) is None
    b.record(p1, True, now)
    assert b.state is BreakerState.HALF_OPEN
    b.record(p2, True, now)
    assert b.state is BreakerState.CLOSED


def test_failed_probe_reopens_for_longer() -> None:
    b = Breaker(BreakerConfig(consecutive_failures=1, open_base=1.0, open_jitter=0.0))
    _fail(b, 0.0)
    assert b.open_until == 1.0
    probe = b.acquire(1.0)
    assert probe is not None
    b.record(probe, False, 1.0)
    assert b.state is BreakerState.OPEN
    assert b.open_until == 3.0  # 2 s the second time
    probe = b.acquire(3.0)
    assert probe is not None
    b.record(probe, False, 3.0)
    assert b.open_until == 7.0


def test_after_closing_the_next_trip_starts_from_the_base_period_again() -> None:
    cfg = BreakerConfig(consecutive_failures=1, open_base=1.0, open_jitter=0.0, probe_successes=1)
    b = Breaker(cfg)
    _fail(b, 0.0)
    probe = b.acquire(1.0)
    assert probe is not None
    b.record(probe, False, 1.0)  # second trip: 2 s
    assert b.open_until == 3.0
    probe = b.acquire(3.0)
    assert probe is not None
    b.record(probe, True, 3.0)
    assert b.state is BreakerState.CLOSED
    _fail(b, 4.0)
    assert b.open_until == 5.0


def test_cancelled_probe_frees_its_slot() -> None:
    b = Breaker(SMALL, rng=random.Random(1))
    for _ in range(3):
        _fail(b, 0.0)
    now = b.open_until
    p1, p2 = b.acquire(now), b.acquire(now)
    assert p1 is not None
    assert p2 is not None
    assert b.acquire(now) is None
    b.release(p1)
    assert b.acquire(now) is not None


def test_probe_never_settled_is_reclaimed_after_probe_timeout() -> None:
    b = Breaker(SMALL, rng=random.Random(1))
    for _ in range(3):
        _fail(b, 0.0)
    now = b.open_until
    assert b.acquire(now) is not None
    assert b.acquire(now) is not None
    assert b.acquire(now + 4.9) is None
    assert b.retry_in(now) == pytest.approx(5.0)
    assert b.acquire(now + 5.0) is not None


def test_outcome_of_a_call_started_before_a_trip_is_ignored() -> None:
    b = Breaker(SMALL, rng=random.Random(1))
    slow = b.acquire(0.0)
    assert slow is not None
    for _ in range(3):
        _fail(b, 0.0)
    probe = b.acquire(b.open_until)
    assert probe is not None
    assert b.state is BreakerState.HALF_OPEN
    b.record(slow, True, b.open_until)
    b.record(slow, True, b.open_until)
    assert b.state is BreakerState.HALF_OPEN


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        BreakerConfig(failure_rate=1.5)
    with pytest.raises(ValueError, match="open_max"):
        BreakerConfig(open_base=10.0, open_max=5.0)


@dataclass
class _Model:
    """The breaker as its documentation states it, kept deliberately naive."""

    cfg: BreakerConfig
    state: str = "closed"
    generation: int = 0
    trips: int = 0
    open_until: float = 0.0
    outcomes: list[tuple[float, bool]] = field(default_factory=list)
    probes: dict[int, float] = field(default_factory=dict)  # permit id -> issued at
    successes: int = 0

    def move(self, state: str) -> None:
        self.state = state
        self.generation += 1
        self.outcomes = []
        self.probes = {}
        self.successes = 0

    def period_bounds(self) -> tuple[float, float]:
        full = min(self.cfg.open_max, self.cfg.open_base * 2 ** (self.trips - 1))
        return full * (1 - self.cfg.open_jitter), full


class BreakerMachine(RuleBasedStateMachine):
    permits = Bundle("permits")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.breaker = Breaker(SMALL, rng=random.Random(7))
        self.model = _Model(SMALL)
        self.ids: dict[int, tuple[Permit, int]] = {}

    def _trip(self) -> None:
        self.model.trips += 1
        low, high = self.model.period_bounds()
        period = self.breaker.open_until - self.now
        assert low - 1e-9 <= period <= high + 1e-9, (period, low, high)
        self.model.open_until = self.breaker.open_until
        self.model.move("open")

    @rule(dt=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, 5.0, 11.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(target=permits)
    def acquire(self) -> int:
        m = self.model
        if m.state == "open" and self.now >= m.open_until:
            m.move("half_open")
        if m.state == "half_open":
            m.probes = {k: t for k, t in m.probes.items() if self.now - t < SMALL.probe_timeout}
        expect = m.state == "closed" or (
            m.state == "half_open" and len(m.probes) < SMALL.half_open_probes
        )
        permit = self.breaker.acquire(self.now)
        assert (permit is not None) == expect
        if permit is None:
            return -1
        assert permit.probe == (m.state == "half_open")
        key = len(self.ids)
        self.ids[key] = (permit, m.generation)
        if permit.probe:
            m.probes[key] = self.now
        return key

    @rule(key=consumes(permits), ok=st.booleans())
    def settle(self, key: int, ok: bool) -> None:
        if key < 0:
            return
        permit, generation = self.ids[key]
        m = self.model
        m.probes.pop(key, None)
        self.breaker.record(permit, ok, self.now)
        if generation != m.generation:
            return
        if m.state == "half_open":
            if not ok:
                self._trip()
                return
            m.successes += 1
            if m.successes >= SMALL.probe_successes:
                m.trips = 0
                m.move("closed")
            return
        m.outcomes.append((self.now, ok))
        window = [o for t, o in m.outcomes if t > self.now - SMALL.window]
        failures = window.count(False)
        run = 0  # consecutive failures since the last transition, window or not
        for _, o in reversed(m.outcomes):
            if o:
                break
            run += 1
        if run >= SMALL.consecutive_failures or (
            len(window) >= SMALL.min_calls and failures >= SMALL.failure_rate * len(window)
        ):
            self._trip()

    @rule(key=consumes(permits))
    def cancel(self, key: int) -> None:
        if key < 0:
            return
        permit, _ = self.ids[key]
        self.model.probes.pop(key, None)
        self.breaker.release(permit)

    @invariant()
    def same_state(self) -> None:
        assert self.breaker.state.value == self.model.state

    @invariant()
    def probes_are_bounded(self) -> None:
        assert self.breaker.probes_in_flight <= SMALL.half_open_probes

    @invariant()
    def open_means_refusing_until_the_deadline(self) -> None:
        if self.breaker.state is BreakerState.OPEN:
            assert self.breaker.retry_in(self.now) == max(0.0, self.model.open_until - self.now)


# derandomize: the same examples every run, as the house rules want deterministic tests.
BreakerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, derandomize=True
)
test_breaker_matches_model = BreakerMachine.TestCase
