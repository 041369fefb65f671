"""The per-target sender over httpx.MockTransport and a fake clock: batching, retries, breaker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from vochi_crm_client import parse_retry_after
from vochi_crm_client._backoff import BackoffPolicy, delay
from vochi_crm_client._breaker import Breaker
from vochi_crm_client._config import BreakerConfig, DispatchConfig
from vochi_crm_client._dispatch import TargetSender
from vochi_crm_client._event import CallEvent
from vochi_crm_client._tasks import BackgroundTasks
from vochi_crm_client.testing import FakeClock, seeded_rng, settle

pytestmark = pytest.mark.anyio  # before collection, so parametrized async tests work

URL = "http://crm.test/api/events"
Handler = Callable[[list[dict[str, Any]]], httpx.Response]


def ok(events: list[dict[str, Any]]) -> httpx.Response:
    return httpx.Response(202, json={"accepted": len(events), "duplicates": 0, "rejected": []})


def refused() -> httpx.Response:
    raise httpx.ConnectError("refused")


def unavailable() -> httpx.Response:
    return httpx.Response(503)


class Outage:
    """A handler that answers with ``failure()`` until ``up`` is set, then accepts everything."""

    def __init__(self, failure: Callable[[], httpx.Response]) -> None:
        self.failure = failure
        self.up = False

    def __call__(self, events: list[dict[str, Any]]) -> httpx.Response:
        return ok(events) if self.up else self.failure()


class Target:
    """A scripted receiver: records every POST's events, answers with the current handler."""

    def __init__(self, handler: Handler = ok) -> None:
        self.handler = handler
        self.posts: list[list[dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)["events"]
        self.posts.append(events)
        return self.handler(events)

    @property
    def keys(self) -> list[str]:
        return [e["idempotency_key"] for post in self.posts for e in post]


def ev(kind: str, uid: str, ent: str = "0367", **payload: Any) -> CallEvent:
    if kind == "dial":
        payload.setdefault("Extensions", ["150"])
    return CallEvent(enterprise_number=ent, event_type=kind, call_unique_id=uid, payload=payload)  # type: ignore[arg-type]


@asynccontextmanager
async def sender_for(
    target: Target,
    clock: FakeClock,
    *,
    breaker: BreakerConfig | None = None,
    **config: Any,
) -> AsyncIterator[TargetSender]:
    config.setdefault("max_in_flight", 1)
    async with httpx.MockTransport(target) as transport:
        tasks = BackgroundTasks("test-sender")
        tasks.open()
        sender = TargetSender(
            name="crm",
            url=URL,
            transport=transport,
            config=DispatchConfig(**config),
            breaker=Breaker(breaker or BreakerConfig(), rng=seeded_rng(1)),
            clock=clock,
            sleep=clock.sleep,
            rng=seeded_rng(2),
        )
        sender.start(tasks)
        try:
            yield sender
        finally:
            await tasks.close()


async def test_full_batches_go_at_once_and_the_remainder_after_linger() -> None:
    clock, target = FakeClock(), Target()
    async with sender_for(target, clock, linger=0.005) as sender:
        for i in range(250):
            sender.put(ev("hangup", f"1.{i}"))
        await settle()
        assert [len(p) for p in target.posts] == [100, 100]
        clock.advance(0.005)
        await settle()
        assert [len(p) for p in target.posts] == [100, 100, 50]
        assert sender.stats()["delivered"] == 250


async def test_a_partial_batch_waits_exactly_the_linger() -> None:
    clock, target = FakeClock(), Target()
    async with sender_for(target, clock, linger=0.005) as sender:
        for i in range(3):
            sender.put(ev("hangup", f"1.{i}"))
        await settle()
        clock.advance(0.004)
        await settle()
        assert target.posts == []
        clock.advance(0.001)
        await settle()
        assert [len(p) for p in target.posts] == [3]


async def test_linger_is_cut_short_when_the_batch_fills() -> None:
    clock, target = FakeClock(), Target()
    async with sender_for(target, clock, linger=10.0, batch_max=10) as sender:
        sender.put(ev("hangup", "1.0"))
        await settle()
        assert target.posts == []
        for i in range(1, 10):
            sender.put(ev("hangup", f"1.{i}"))
        await settle()
        assert [len(p) for p in target.posts] == [10]


async def test_batches_respect_the_byte_limit() -> None:
    clock, target = FakeClock(), Target()
    async with sender_for(target, clock, batch_max_bytes=3000) as sender:
        for i in range(20):
            sender.put(ev("hangup", f"1.{i}", Note="x" * 500))
        await clock.run_for(0.1, step=0.01)
        sizes = [len(p) for p in target.posts]
        assert sum(sizes) == 20
        assert max(sizes) < 20


async def test_retryable_failures_follow_the_full_jitter_schedule() -> None:
    clock = FakeClock()
    answers = iter([httpx.Response(503), httpx.Response(500)])
    target = Target(lambda events: next(answers, None) or ok(events))
    rng = seeded_rng(2)
    policy = BackoffPolicy(base=1.0, cap=10.0)
    first, second = delay(1, policy, rng), delay(2, policy, rng)
    async with sender_for(
        target, clock, linger=0, retries=2, backoff_base=1.0, backoff_max=10.0
    ) as sender:
        sender.put(ev("hangup", "1.1"))
        await settle()
        assert len(target.posts) == 1
        clock.advance(first * 0.99)
        await settle()
        assert len(target.posts) == 1
        clock.advance(first * 0.01 + 1e-9)
        await settle()
        assert len(target.posts) == 2
        clock.advance(second + 1e-9)
        await settle()
        assert len(target.posts) == 3
        stats = sender.stats()
        assert stats["delivered"] == 1
        assert stats["retried"] == 2


async def test_retry_after_is_honoured() -> None:
    clock = FakeClock()
    answers = iter([httpx.Response(429, headers={"Retry-After": "7"})])
    target = Target(lambda events: next(answers, None) or ok(events))
    async with sender_for(target, clock, linger=0, backoff_base=0.01, backoff_max=0.02) as sender:
        sender.put(ev("hangup", "1.1"))
        await settle()
        clock.advance(6.9)
        await settle()
        assert len(target.posts) == 1
        clock.advance(0.1)
        await settle()
        assert len(target.posts) == 2


async def test_retry_after_is_capped() -> None:
    clock = FakeClock()
    answers = iter([httpx.Response(503, headers={"Retry-After": "3600"})])
    target = Target(lambda events: next(answers, None) or ok(events))
    async with sender_for(target, clock, linger=0, retry_after_max=5.0) as sender:
        sender.put(ev("hangup", "1.1"))
        await settle()
        clock.advance(5.0)
        await settle()
        assert len(target.posts) == 2


@pytest.mark.parametrize("status", [401, 403, 404, 409])
async def test_other_4xx_rejects_the_batch_without_retry(status: int) -> None:
    clock = FakeClock()
    target = Target(lambda events: httpx.Response(status))
    async with sender_for(target, clock, linger=0) as sender:
        sender.put(ev("hangup", "1.1"))
        sender.put(ev("hangup", "1.2"))
        await clock.run_for(60, step=1)
        assert len(target.posts) == 1
        stats = sender.stats()
        assert stats["rejected"] == 2
        assert stats["dropped"]["rejected"] == 2
        assert stats["queued"] == 0
        assert stats["breaker"]["state"] == "closed"


async def test_a_400_batch_is_split_to_isolate_the_bad_event() -> None:
    clock = FakeClock()

    def handler(events: list[dict[str, Any]]) -> httpx.Response:
        if any(e["call_unique_id"] == "poison.1" for e in events):
            return httpx.Response(400, json={"error": {"code": "bad", "message": "bad"}})
        return ok(events)

    target = Target(handler)
    async with sender_for(target, clock, linger=0, batch_max=8) as sender:
        for i in range(7):
            sender.put(ev("hangup", f"1.{i}"))
        sender.put(ev("hangup", "poison.1"))
        await settle()
        stats = sender.stats()
        assert stats["delivered"] == 7
        assert stats["rejected"] == 1
        assert len(target.posts) <= 1 + 2 * 3  # log2(8) levels of halves


async def test_per_event_rejections_are_counted_and_never_retried() -> None:
    clock = FakeClock()

    def handler(events: list[dict[str, Any]]) -> httpx.Response:
        return httpx.Response(
            202, json={"accepted": 1, "duplicates": 1, "rejected": [{"index": 1, "error": "bad"}]}
        )

    target = Target(handler)
    async with sender_for(target, clock, linger=0) as sender:
        for i in range(3):
            sender.put(ev("hangup", f"1.{i}"))
        await clock.run_for(30, step=1)
        stats = sender.stats()
        assert len(target.posts) == 1
        assert stats["rejected"] == 1
        assert stats["dropped"]["rejected"] == 1
        assert stats["delivered"] == 2
        assert stats["duplicates"] == 1


async def test_connect_errors_and_timeouts_are_retried() -> None:
    clock = FakeClock()
    errors = iter([httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])

    def handler(events: list[dict[str, Any]]) -> httpx.Response:
        error = next(errors, None)
        if error is not None:
            raise error
        return ok(events)

    target = Target(handler)
    async with sender_for(target, clock, linger=0) as sender:
        sender.put(ev("hangup", "1.1"))
        await clock.run_for(2, step=0.05)
        assert len(target.posts) == 3
        assert sender.stats()["delivered"] == 1


async def test_history_survives_an_outage_and_the_breaker_paces_the_probes() -> None:
    clock = FakeClock()
    outage = Outage(refused)
    target = Target(outage)
    breaker = BreakerConfig(consecutive_failures=3, open_base=5.0, open_max=20.0, open_jitter=0.0)
    async with sender_for(target, clock, linger=0, breaker=breaker) as sender:
        for i in range(5):
            sender.put(ev("hangup", f"1.{i}"))
        await clock.run_for(120, step=0.5)
        attempts_while_down = len(target.posts)
        stats = sender.stats()
        assert stats["breaker"]["state"] == "open"
        assert stats["queued"] == 5
        # Open periods of 5, 10, 20, 20, ... s: a handful of probes, not a hot loop.
        assert attempts_while_down < 20
        outage.up = True
        await clock.run_for(30, step=0.5)
        assert sender.stats()["delivered"] == 5
        assert sender.stats()["breaker"]["state"] != "open"
        assert sorted(set(target.keys[attempts_while_down:])) == sorted(
            f"0367:1.{i}:hangup" for i in range(5)
        )


async def test_stale_popups_expire_while_the_target_is_down() -> None:
    clock = FakeClock()
    outage = Outage(unavailable)
    target = Target(outage)
    async with sender_for(target, clock, linger=0, popup_ttl=30.0) as sender:
        sender.put(ev("dial", "1.1"))
        sender.put(ev("bridge", "1.1"))
        sender.put(ev("dial", "1.2"))
        sender.put(ev("hangup", "1.3"))
        await clock.run_for(31, step=0.5)
        assert sender.stats()["dropped"]["expired"] == 3
        outage.up = True
        await clock.run_for(30, step=0.5)
        delivered_after = [k for post in target.posts[-1:] for k in [e["event_type"] for e in post]]
        assert delivered_after == ["hangup"]
        assert sender.stats()["delivered"] == 1


async def test_the_hangup_supersedes_queued_and_in_flight_popups() -> None:
    clock = FakeClock()
    outage = Outage(unavailable)
    target = Target(outage)
    async with sender_for(target, clock, linger=0, batch_max=2) as sender:
        sender.put(ev("dial", "1.1"))
        sender.put(ev("bridge", "1.1"))  # these two are in flight (retrying)
        sender.put(ev("dial", "1.1", Extensions=["150", "151"]))  # this one is queued
        await settle()
        sender.put(ev("hangup", "1.1"))
        outage.up = True
        await clock.run_for(10, step=0.1)
        stats = sender.stats()
        assert stats["dropped"]["superseded"] == 3
        assert [e["event_type"] for e in target.posts[-1]] == ["hangup"]
        assert stats["delivered"] == 1


async def test_one_enterprise_flood_does_not_delay_another() -> None:
    clock, target = FakeClock(), Target()
    async with sender_for(target, clock, linger=0, max_queue=100_000) as sender:
        for i in range(5000):
            sender.put(ev("hangup", f"1.{i}", ent="0001"))
        sender.put(ev("hangup", "9.9", ent="0002"))
        await settle(5)
        assert target.posts, "nothing sent"
        first = target.posts[0]
        assert "0002" in {e["enterprise_number"] for e in first}


async def test_drain_after_close_flushes_everything() -> None:
    clock, target = FakeClock(), Target()
    async with sender_for(target, clock, linger=10.0, max_in_flight=2) as sender:
        for i in range(150):
            sender.put(ev("hangup", f"1.{i}"))
        sender.close()
        with anyio.fail_after(5):
            await sender.wait_idle()
        assert sender.stats()["delivered"] == 150


def test_parse_retry_after_accepts_seconds_and_http_dates() -> None:
    from datetime import UTC, datetime

    now = datetime(2025, 11, 26, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 26 Nov 2025 10:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("²") is None  # isdigit() admits it; float() would raise
    assert parse_retry_after(None) is None


async def test_an_unexpected_error_is_logged_and_the_batch_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    errors = iter([RuntimeError("a bug in a transport")])

    def handler(events: list[dict[str, Any]]) -> httpx.Response:
        error = next(errors, None)
        if error is not None:
            raise error
        return ok(events)

    target = Target(handler)
    async with sender_for(target, clock, linger=0) as sender:
        sender.put(ev("hangup", "1.1"))
        await settle()
        assert sender.stats()["queued"] == 1
        assert "dispatch.worker_error target=crm error=RuntimeError" in caplog.text
        assert "Traceback (most recent call last)" in caplog.text  # the stack trace is kept
        assert "a bug in a transport" not in caplog.text  # messages may carry secrets
        await clock.run_for(1.0, step=0.5)
        assert sender.stats()["delivered"] == 1


async def test_one_event_the_target_chokes_on_does_not_hold_the_others_back() -> None:
    """A 500 for every batch holding one event: the rest get through, that event is kept."""
    clock = FakeClock()

    def handler(events: list[dict[str, Any]]) -> httpx.Response:
        if any(e["call_unique_id"] == "poison.1" for e in events):
            return httpx.Response(500)
        return ok(events)

    target = Target(handler)
    breaker = BreakerConfig(consecutive_failures=50, min_calls=50)  # the target is "up"
    async with sender_for(target, clock, linger=0, batch_max=8, breaker=breaker) as sender:
        for i in range(3):
            sender.put(ev("hangup", f"1.{i}"))
        sender.put(ev("hangup", "poison.1"))
        for i in range(3, 7):
            sender.put(ev("hangup", f"1.{i}"))
        await clock.run_for(20, step=0.05)
        stats = sender.stats()
        assert stats["delivered"] == 7
        assert stats["queued"] + stats["in_flight"] == 1  # history is never dropped
        assert stats["dropped"] == dict.fromkeys(stats["dropped"], 0)


async def test_an_unreachable_target_keeps_the_batch_whole_and_in_order() -> None:
    clock = FakeClock()
    outage = Outage(refused)
    target = Target(outage)
    breaker = BreakerConfig(consecutive_failures=50, min_calls=50)
    async with sender_for(target, clock, linger=0, breaker=breaker) as sender:
        for i in range(6):
            sender.put(ev("hangup", f"1.{i}"))
        await clock.run_for(5, step=0.05)
        assert {len(p) for p in target.posts} == {6}
        outage.up = True
        await clock.run_for(5, step=0.05)
        assert [e["call_unique_id"] for e in target.posts[-1]] == [f"1.{i}" for i in range(6)]
