"""RefreshingCache with a fake clock: freshness, single-flight, invalidation, full reloads."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from vochi_crm_client import (
    CACHE_STATS_KEYS,
    NOT_LOADED,
    CacheSettings,
    LoadError,
    LoadTimeout,
    LookupStatus,
    RefreshingCache,
    StateError,
)
from vochi_crm_client.testing import FakeClock, seeded_rng, settle

SETTINGS = CacheSettings(
    refresh_interval=200.0,
    refresh_jitter=0.1,
    ttl=60.0,
    ttl_jitter=0.0,
    negative_ttl=10.0,
    max_staleness=300.0,
    retry_interval=5.0,
    sweep_interval=1.0,
)


class Source:
    """A stand-in for the database: what the loaders read, and how often they were called."""

    def __init__(self, **data: str) -> None:
        self.data: dict[str, str] = dict(data)
        self.calls: list[str] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def _enter(self, what: str) -> None:
        self.calls.append(what)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionRefusedError("database is down")

    # Both read the data before waiting at the gate: a query sees the state when it starts.
    async def load_one(self, key: str) -> str | None:
        value = self.data.get(key)
        await self._enter(key)
        return value

    async def load_all(self) -> dict[str, str]:
        snapshot = dict(self.data)
        await self._enter("*")
        return snapshot


def make(
    source: Source, clock: FakeClock, *, full: bool = True, **kwargs: Any
) -> RefreshingCache[str, str]:
    return RefreshingCache(
        load_one=source.load_one,
        load_all=source.load_all if full else None,
        settings=kwargs.pop("settings", SETTINGS),
        clock=clock,
        sleep=clock.sleep,
        rng=seeded_rng(1),
        name="test",
        **kwargs,
    )


def spawn(coro: Any) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(coro)


async def test_a_miss_loads_once_then_reads_are_hits() -> None:
    clock, source = FakeClock(), Source(a="A")
    async with make(source, clock) as cache:
        assert cache.peek("a") is NOT_LOADED
        assert await cache.get("a") == "A"
        assert cache.peek("a") == "A"
        assert cache.lookup("a").status is LookupStatus.HIT
        stats = cache.stats()
    assert source.calls == ["a"]
    assert (stats["hits"], stats["misses"], stats["loads"], stats["size"]) == (2, 2, 1, 1)


async def test_unknown_key_is_cached_negatively_for_the_negative_ttl() -> None:
    clock, source = FakeClock(), Source()
    async with make(source, clock) as cache:
        for _ in range(100):
            assert await cache.get("junk") is None
        assert cache.lookup("junk").status is LookupStatus.NEGATIVE
        await clock.run_for(10)
        assert cache.peek("junk") is NOT_LOADED
        assert await cache.get("junk") is None
        assert cache.stats()["negative_hits"] >= 99
    assert source.calls == ["junk", "junk"]


async def test_stale_entry_is_served_while_one_revalidation_runs() -> None:
    clock, source = FakeClock(), Source(a="A1")
    async with make(source, clock) as cache:
        await cache.get("a")
        source.data["a"] = "A2"
        await clock.run_for(60)
        source.gate = asyncio.Event()
        assert [cache.peek("a") for _ in range(5)] == ["A1"] * 5
        assert cache.lookup("a").status is LookupStatus.STALE
        await settle()
        source.gate.set()
        await settle()
        assert cache.lookup("a").status is LookupStatus.HIT
        assert cache.peek("a") == "A2"
        assert cache.stats()["stale_hits"] == 6
    assert source.calls == ["a", "a"]


async def test_failed_revalidation_keeps_the_old_value_and_waits_before_retrying() -> None:
    clock, source = FakeClock(), Source(a="A1")
    async with make(source, clock) as cache:
        await cache.get("a")
        await clock.run_for(60)
        source.fail = True
        assert cache.peek("a") == "A1"
        await settle()
        assert cache.peek("a") == "A1"
        await settle()
        assert source.calls == ["a", "a"]
        assert cache.stats()["load_errors"] == 1
        await clock.run_for(5)
        assert cache.peek("a") == "A1"
        await settle()
        assert source.calls == ["a", "a", "a"]


async def test_entry_is_dropped_after_the_maximum_staleness() -> None:
    clock, source = FakeClock(), Source(a="A")
    async with make(source, clock, full=False) as cache:
        await cache.get("a")
        source.fail = True
        await clock.run_for(299)
        assert cache.peek("a") == "A"
        await clock.run_for(1)
        assert cache.peek("a") is NOT_LOADED
        with pytest.raises(LoadError):
            await cache.get("a")


async def test_concurrent_misses_share_one_load_and_survive_the_first_callers_cancel() -> None:
    clock, source = FakeClock(), Source(a="A")
    source.gate = asyncio.Event()
    async with make(source, clock) as cache:
        tasks = [spawn(cache.get("a")) for _ in range(100)]
        await settle()
        tasks[0].cancel()
        await settle()
        source.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == ["A"] * 99
    assert source.calls == ["a"]


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    clock, source = FakeClock(), Source(a="A")
    source.gate, source.fail = asyncio.Event(), True
    async with make(source, clock) as cache:
        tasks = [spawn(cache.get("a")) for _ in range(10)]
        await settle()
        source.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, LoadError) for r in results)
        assert all(isinstance(r.__cause__, ConnectionRefusedError) for r in results)
        assert cache.peek("a") is NOT_LOADED
        source.fail = False
        assert await cache.get("a") == "A"
    assert source.calls == ["a", "a"]


async def test_a_loader_timeout_becomes_load_timeout() -> None:
    async def times_out(key: str) -> str:
        raise TimeoutError

    clock = FakeClock()
    async with RefreshingCache(load_one=times_out, clock=clock, sleep=clock.sleep) as cache:
        with pytest.raises(LoadTimeout):
            await cache.get("a")


async def test_invalidation_during_a_load_discards_its_result() -> None:
    clock, source = FakeClock(), Source(a="old")
    source.gate = asyncio.Event()
    async with make(source, clock) as cache:
        first = spawn(cache.get("a"))
        await settle()
        source.data["a"] = "new"
        cache.invalidate("a")
        source.gate.set()
        assert await first == "old"
        assert cache.peek("a") is NOT_LOADED
        assert await cache.get("a") == "new"


async def test_invalidating_a_known_key_refetches_it_in_the_background() -> None:
    clock, source = FakeClock(), Source(a="A1")
    async with make(source, clock) as cache:
        await cache.get("a")
        source.data["a"] = "A2"
        cache.invalidate("a")
        assert cache.peek("a") is NOT_LOADED
        await settle()
        assert cache.peek("a") == "A2"
        assert cache.stats()["invalidations"] == 1


async def test_invalidate_if_drops_matching_entries_including_negatives() -> None:
    clock, source = FakeClock(), Source(a="X", b="Y")
    async with make(source, clock) as cache:
        for key in ("a", "b", "c"):
            await cache.get(key)
        dropped = cache.invalidate_if(lambda key, value: value in ("X", None))
        assert dropped == 2
        assert [cache.peek(k) for k in ("a", "b", "c")] == [NOT_LOADED, "Y", NOT_LOADED]


async def test_full_reload_swaps_the_snapshot_and_keeps_true_negatives() -> None:
    clock, source = FakeClock(), Source(a="A", b="B")
    async with make(source, clock) as cache:
        await cache.reload_all()
        assert await cache.get("zzz") is None
        del source.data["b"]
        source.data["a"] = "A2"
        clock.advance(7)
        await cache.reload_all()
        assert (cache.peek("a"), cache.peek("b"), cache.peek("zzz")) == ("A2", NOT_LOADED, None)
        stats = cache.stats()
    assert (stats["full_reloads"], stats["size"], stats["negative_size"]) == (2, 1, 1)
    assert stats["snapshot_age"] == 0.0


async def test_failed_full_reload_keeps_the_old_snapshot_and_counts() -> None:
    clock, source = FakeClock(), Source(a="A")
    async with make(source, clock) as cache:
        await cache.reload_all()
        source.fail = True
        clock.advance(30)
        with pytest.raises(LoadError):
            await cache.reload_all()
        assert cache.peek("a") == "A"
        stats = cache.stats()
    assert (stats["full_reload_errors"], stats["load_errors"]) == (1, 1)
    assert stats["snapshot_age"] == 30.0


async def test_reload_requests_during_a_reload_share_exactly_one_more_reload() -> None:
    clock, source = FakeClock(), Source(a="A1")
    source.gate = asyncio.Event()
    async with make(source, clock) as cache:
        first = spawn(cache.reload_all())
        await settle()
        source.data["a"] = "A2"
        later = [spawn(cache.reload_all()) for _ in range(5)]
        await settle()
        source.gate.set()
        await asyncio.gather(first, *later)
        assert cache.peek("a") == "A2"
    assert source.calls == ["*", "*"]


async def test_key_invalidated_during_a_full_reload_is_not_taken_from_it() -> None:
    clock, source = FakeClock(), Source(a="old", b="B")
    source.gate = asyncio.Event()
    async with make(source, clock) as cache:
        running = spawn(cache.reload_all())
        await settle()
        cache.invalidate("a")
        source.gate.set()
        await running
        assert (cache.peek("a"), cache.peek("b")) == (NOT_LOADED, "B")


async def test_invalidate_all_during_a_reload_discards_it_and_reloads_again() -> None:
    clock, source = FakeClock(), Source(a="old")
    source.gate = asyncio.Event()
    async with make(source, clock) as cache:
        running = spawn(cache.reload_all())
        await settle()
        source.data["a"] = "new"
        cache.invalidate_all()
        assert cache.peek("a") is NOT_LOADED
        source.gate.set()
        await running
        await settle()
        assert cache.peek("a") == "new"
    assert source.calls == ["*", "*"]


async def test_periodic_full_reload_runs_within_the_jittered_interval() -> None:
    clock, source = FakeClock(), Source(a="A")
    async with make(source, clock) as cache:
        await clock.run_for(179)
        assert source.calls == []
        await clock.run_for(42)
        assert source.calls == ["*"]
        assert cache.peek("a") == "A"
        assert cache.stats()["full_reloads"] == 1


async def test_using_a_closed_or_unopened_cache_raises_state_error() -> None:
    clock, source = FakeClock(), Source(a="A")
    cache = make(source, clock)
    with pytest.raises(StateError):
        await cache.get("a")
    async with cache:
        pass
    with pytest.raises(StateError):
        await cache.reload_all()
    with pytest.raises(StateError):
        async with cache:
            pass


async def test_closing_fails_pending_waiters_with_state_error() -> None:
    clock, source = FakeClock(), Source(a="A")
    source.gate = asyncio.Event()
    async with make(source, clock) as cache:
        waiter = spawn(cache.get("a"))
        await settle()
    with pytest.raises(StateError):
        await waiter


async def test_stats_are_json_serialisable_with_the_documented_keys() -> None:
    clock, source = FakeClock(), Source(a="A")
    async with make(source, clock) as cache:
        await cache.get("a")
        stats = cache.stats()
    assert tuple(stats) == CACHE_STATS_KEYS
    assert json.loads(json.dumps(stats)) == stats
    assert stats["state"] == "open"


async def test_keys_are_described_by_describe_key_in_logs_and_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, source = FakeClock(), Source()
    source.fail = True
    cache = make(source, clock, describe_key=lambda key: "***" + key[-4:])
    async with cache:
        with caplog.at_level(logging.WARNING), pytest.raises(LoadError) as info:
            await cache.get("secret-token-abcd")
    assert "secret-token" not in str(info.value)
    assert "secret-token" not in caplog.text
    assert "***abcd" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 0},
        {"negative_ttl": -1},
        {"refresh_jitter": 1.0},
        {"ttl": 100, "max_staleness": 50},
        {"load_timeout": float("inf")},
    ],
)
def test_invalid_settings_are_rejected_when_built(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="CacheSettings"):
        CacheSettings(**kwargs)


async def test_a_pre_bound_peek_always_reads_the_current_snapshot() -> None:
    clock, source = FakeClock(), Source(a="A1")
    async with make(source, clock) as cache:
        peek = cache.peek
        assert peek("a") is NOT_LOADED
        assert cache.lookup("a").status is LookupStatus.MISS
        await cache.reload_all()
        assert peek("a") == "A1"
        source.data["a"] = "A2"
        await cache.reload_all()
        assert peek("a") == "A2"
        cache.invalidate_all()
        assert peek("a") is NOT_LOADED
