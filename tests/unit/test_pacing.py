"""Per-key pacing below RetailCRM's 10 req/s and 40 req/s telephony limits (fake clock)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retailcrm_service.crm.pacing import Pacer, PacingConfig, is_telephony, key_id


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


# --------------------------------------------------------------------------- two lanes

TEL = "telephony/call/event"
INTERVAL = 1 / 32  # the default telephony pace


class SimClock:
    """Virtual time for many concurrent waiters: ``advance_to`` wakes the sleepers that are due."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), fut))
        await fut

    def next_wake(self) -> float | None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # cancelled sleepers
        return self._sleepers[0][0] if self._sleepers else None

    def advance_to(self, when: float) -> None:
        self.now = max(self.now, when)
        while self._sleepers and self._sleepers[0][0] <= self.now:
            fut = heapq.heappop(self._sleepers)[2]
            if not fut.done():
                fut.set_result(None)


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


@dataclass
class Request:
    arrival: float
    interactive: bool
    cancel_after: float | None = None
    granted: float | None = None
    cancelled: float | None = None
    order: int | None = None  # place among all grants


async def simulate(pacer: Pacer, clock: SimClock, requests: list[Request]) -> None:
    """Start each request at its arrival (cancel it later if asked) and run until all are over."""
    start = clock.now
    tasks: dict[int, asyncio.Task[None]] = {}
    sequence = itertools.count()

    async def one(request: Request) -> None:
        await pacer.acquire("key-A", TEL, interactive=request.interactive)
        request.granted = clock.now
        request.order = next(sequence)

    events: list[tuple[float, int, str, int]] = []
    for i, r in enumerate(requests):
        events.append((start + r.arrival, 0, "start", i))
        if r.cancel_after is not None:
            events.append((start + r.arrival + r.cancel_after, 1, "cancel", i))
    heapq.heapify(events)
    while True:
        await settle()
        wake = clock.next_wake()
        times = [t for t in (wake, events[0][0] if events else None) if t is not None]
        if not times:
            break
        clock.advance_to(min(times))
        while events and events[0][0] <= clock.now:
            _, _, action, i = heapq.heappop(events)
            if action == "start":
                tasks[i] = asyncio.create_task(one(requests[i]))
            elif not tasks[i].done():
                tasks[i].cancel()
                requests[i].cancelled = clock.now
        await settle()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert all(task.done() for task in tasks.values())


def grants(requests: list[Request], start: float = 1000.0) -> list[float]:
    return sorted(r.granted - start for r in requests if r.granted is not None)


async def test_an_interactive_acquire_is_granted_within_one_slot_while_delivery_saturates() -> None:
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    delivery = [Request(arrival=0.0, interactive=False) for _ in range(40)]
    lookup = Request(arrival=0.1, interactive=True)
    await simulate(pacer, clock, [*delivery, lookup])
    assert lookup.granted is not None
    assert lookup.granted - (1000.0 + 0.1) <= INTERVAL + 1e-9
    # ... and delivery still got everything, at full pace, just one slot later.
    assert grants([*delivery, lookup]) == pytest.approx([i * INTERVAL for i in range(41)])


# Of the first second's 32 slots, the first goes to the lookup that came before any delivery
# waited; delivery gets its share of the other 31.
@pytest.mark.parametrize(("share", "ordinary_at_least"), [(0.5, 15), (0.75, 7)])
async def test_a_flood_of_lookups_leaves_delivery_its_share_of_the_key(
    share: float, ordinary_at_least: int
) -> None:
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep, config=PacingConfig(interactive_share=share))
    lookups = [Request(arrival=i * 0.001, interactive=True) for i in range(200)]
    delivery = [Request(arrival=0.0, interactive=False) for _ in range(40)]
    await simulate(pacer, clock, [*lookups, *delivery])
    granted = [r for r in [*lookups, *delivery] if r.granted is not None]
    in_first_second = [r for r in granted if (r.granted or 0.0) - 1000.0 < 1.0]
    assert len(in_first_second) == 32
    assert sum(1 for r in in_first_second if not r.interactive) >= ordinary_at_least
    # lookups still go first within their share
    assert sum(1 for r in in_first_second if r.interactive) >= 32 - ordinary_at_least


def test_the_interactive_share_is_validated() -> None:
    with pytest.raises(ValueError, match="interactive_share"):
        PacingConfig(interactive_share=0)
    assert PacingConfig(interactive_share=1).interactive_streak > 10**9


async def test_delivery_alone_gets_the_full_budget_through_acquire() -> None:
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    delivery = [Request(arrival=0.0, interactive=False) for _ in range(100)]
    await simulate(pacer, clock, delivery)
    assert sum(1 for t in grants(delivery) if t < 1.0) == 32


async def test_ordinary_waiters_keep_their_arrival_order() -> None:
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    delivery = [Request(arrival=i * 0.001, interactive=False) for i in range(10)]
    await simulate(pacer, clock, delivery)
    assert [r.granted for r in delivery] == pytest.approx([1000 + i * INTERVAL for i in range(10)])


async def test_a_cancelled_interactive_waiter_leaves_no_gap_and_no_wedge() -> None:
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    delivery = [Request(arrival=0.0, interactive=False) for _ in range(20)]
    # Cancelled while it waits for its slot (a lookup past its deadline), then a fresh lookup.
    gone = Request(arrival=0.101, interactive=True, cancel_after=0.005)
    later = Request(arrival=0.2, interactive=True)
    await simulate(pacer, clock, [*delivery, gone, later])
    assert gone.granted is None
    assert later.granted is not None
    assert later.granted - 1000.2 <= INTERVAL + 1e-9
    # No slot was lost to the cancelled waiter and delivery was not wedged behind it.
    assert grants([*delivery, later]) == pytest.approx([i * INTERVAL for i in range(21)])
    # The bucket is idle and consistent afterwards: a late newcomer goes at once.
    clock.advance_to(clock.now + 1.0)
    assert pacer.reserve("key-A", TEL) == 0.0


async def test_a_cancelled_delivery_waiter_hands_its_slot_to_the_next() -> None:
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    first = Request(arrival=0.0, interactive=False)
    cancelled = Request(arrival=0.0, interactive=False, cancel_after=0.01)
    rest = [Request(arrival=0.0, interactive=False) for _ in range(5)]
    await simulate(pacer, clock, [first, cancelled, *rest])
    assert cancelled.granted is None
    assert grants([first, *rest]) == pytest.approx([i * INTERVAL for i in range(6)])


@pytest.mark.parametrize("lanes", ["interactive", "ordinary", "mixed"])
@pytest.mark.parametrize("slow_down", ["penalise", "set_share"])
async def test_penalise_and_set_share_slow_both_lanes(lanes: str, slow_down: str) -> None:
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep, config=PacingConfig(recovery_seconds=1e9))
    if slow_down == "penalise":
        pacer.penalise("key-A")
    else:
        pacer.set_share(0.5)
    requests = [
        Request(
            arrival=i * 0.001,
            interactive=lanes == "interactive" or (lanes == "mixed" and i % 2 == 0),
        )
        for i in range(60)
    ]
    await simulate(pacer, clock, requests)
    # Half the pace: 16 slots in the first second (the 17th falls on its end; the penalty's
    # linear recovery over 1e9 s moves it a hair earlier, hence the margin).
    assert sum(1 for t in grants(requests) if t < 0.99) == 16


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Request]]:
    burst = draw(st.integers(min_value=1, max_value=3))
    requests = draw(
        st.lists(
            st.builds(
                Request,
                arrival=st.floats(min_value=0.0, max_value=0.5).map(lambda x: round(x, 3)),
                interactive=st.booleans(),
                cancel_after=st.one_of(
                    st.none(), st.floats(min_value=0.0, max_value=0.3).map(lambda x: round(x, 3))
                ),
            ),
            min_size=1,
            max_size=40,
        )
    )
    return burst, requests


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_both_lanes_together_never_exceed_the_pace_and_interactive_goes_first_within_its_share(
    scenario: tuple[int, list[Request]],
) -> None:
    burst, requests = scenario
    clock = SimClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep, config=PacingConfig(burst=burst))
    asyncio.run(simulate(pacer, clock, requests))
    granted = grants(requests)
    # GCRA: any k grants in a window of length w satisfy k <= burst + w / interval.
    for i, j in itertools.combinations(range(len(granted)), 2):
        assert j - i + 1 <= burst + (granted[j] - granted[i]) / INTERVAL + 1e-6
    # Every request was either granted or given up (nothing wedged).
    for r in requests:
        assert (r.granted is None) == (r.cancelled is not None)
    # Interactive goes first up to its share: an ordinary request granted while an interactive
    # one was already waiting comes right after an interactive grant (the default share allows
    # one interactive grant in a row past waiting delivery).
    by_order = sorted((r for r in requests if r.order is not None), key=lambda r: r.order or 0)
    for index, r in enumerate(by_order):
        if r.interactive:
            continue
        assert r.granted is not None
        for other in requests:
            if not other.interactive:
                continue
            arrived = 1000.0 + other.arrival
            ended = other.granted if other.granted is not None else other.cancelled
            assert ended is not None
            if arrived < r.granted < ended:
                assert index > 0, (r, other)
                assert by_order[index - 1].interactive, (r, other)
