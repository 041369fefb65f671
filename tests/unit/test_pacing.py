"""Per-key pacing below RetailCRM's 10 req/s and 40 req/s telephony limits (fake clock)."""

from __future__ import annotations

import pytest

from retailcrm_service.pacing import Pacer, PacingConfig, is_telephony, key_id


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _requests_in_first_second(pacer: Pacer, clock: Clock, method: str, n: int) -> int:
    """Schedule n back-to-back requests; count those whose slot falls inside one second."""
    start = clock.now
    slots = [start + pacer.reserve("key-A", method) for _ in range(n)]
    return sum(1 for slot in slots if slot < start + 1.0)


def test_general_methods_stay_at_eight_per_second_by_default() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    assert _requests_in_first_second(pacer, clock, "users", 50) == 8


def test_telephony_methods_have_their_own_faster_bucket() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    assert _requests_in_first_second(pacer, clock, "telephony/call/event", 100) == 32
    # the telephony burst did not consume the general bucket
    assert pacer.reserve("key-A", "users") == 0.0


def test_keys_are_paced_independently() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    for _ in range(10):
        pacer.reserve("key-A", "telephony/calls/upload")
    assert pacer.reserve("key-B", "telephony/calls/upload") == 0.0


def test_rate_limit_answer_halves_the_rate_and_it_recovers() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock, config=PacingConfig(recovery_seconds=10.0))
    pacer.penalise("key-A")
    assert pacer.rate_fraction("key-A") == 0.5
    assert _requests_in_first_second(pacer, clock, "telephony/call/event", 100) == 16
    clock.now += 5.0
    assert pacer.rate_fraction("key-A") == pytest.approx(0.75)
    clock.now += 5.0
    assert pacer.rate_fraction("key-A") == 1.0


def test_repeated_penalties_bottom_out_at_the_minimum_fraction() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    for _ in range(20):
        pacer.penalise("key-A")
    assert pacer.rate_fraction("key-A") == 0.125
    assert pacer.stats()[key_id("key-A")]["penalties"] == 20


async def test_acquire_sleeps_until_the_slot() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    for _ in range(3):
        await pacer.acquire("key-A", "users")
    assert clock.slept == [pytest.approx(0.125), pytest.approx(0.125)]


def test_stats_never_hold_the_api_key() -> None:
    pacer = Pacer(clock=Clock())
    pacer.reserve("secret-api-key-1234", "users")
    assert "secret-api-key-1234" not in repr(pacer.stats())


@pytest.mark.parametrize(
    ("method", "telephony"),
    [
        ("telephony/call/event", True),
        ("/api/v5/telephony/calls/upload", True),
        ("users", False),
        ("integration-modules/x/edit", False),
    ],
)
def test_telephony_routes_are_recognised(method: str, telephony: bool) -> None:
    assert is_telephony(method) is telephony


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="rates"):
        PacingConfig(general_rps=0)


def test_an_instance_paces_at_its_share_of_the_budget() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    pacer.set_share(0.5)
    assert _requests_in_first_second(pacer, clock, "telephony/call/event", 100) == 16
    with pytest.raises(ValueError, match="share"):
        pacer.set_share(0)
