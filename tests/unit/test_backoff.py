"""Capped exponential backoff with full jitter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vochi_crm_client import BackoffPolicy, ceiling, delay


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_ceiling_doubles_from_base_until_the_cap() -> None:
    policy = BackoffPolicy(base=0.5, cap=4.0)
    assert [ceiling(n, policy) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_huge_attempt_numbers_stay_at_the_cap_without_overflow() -> None:
    assert ceiling(10**6, BackoffPolicy(base=0.1, cap=30.0, multiplier=3.0)) == 30.0


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    policy = BackoffPolicy(base=1.0, cap=8.0)
    assert delay(3, policy, _Fixed(0.0)) == 0.0
    assert delay(3, policy, _Fixed(0.5)) == 2.0
    assert delay(3, policy, _Fixed(0.999)) == pytest.approx(3.996)


def test_same_seed_gives_the_same_delays() -> None:
    policy = BackoffPolicy()
    first = [delay(n, policy, random.Random(7)) for n in range(1, 10)]
    again = [delay(n, policy, random.Random(7)) for n in range(1, 10)]
    assert first == again


@given(attempt=st.integers(min_value=1, max_value=10_000), seed=st.integers())
def test_delay_is_never_negative_nor_above_the_cap(attempt: int, seed: int) -> None:
    policy = BackoffPolicy(base=0.2, cap=5.0)
    assert 0.0 <= delay(attempt, policy, random.Random(seed)) <= 5.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0},
        {"base": -1},
        {"base": 2.0, "cap": 1.0},
        {"multiplier": 0.5},
        {"cap": float("inf")},
        {"base": float("nan")},
    ],
)
def test_invalid_policies_are_rejected_when_built(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="BackoffPolicy"):
        BackoffPolicy(**kwargs)


def test_attempt_zero_is_rejected() -> None:
    with pytest.raises(ValueError, match="attempt"):
        ceiling(0, BackoffPolicy())


def test_policy_is_frozen_and_keyword_only() -> None:
    policy = BackoffPolicy(base=1.0, cap=2.0)
    with pytest.raises(AttributeError):
        policy.base = 3.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        BackoffPolicy(1.0, 2.0)  # type: ignore[misc]
