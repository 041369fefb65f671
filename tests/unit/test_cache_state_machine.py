"""A Hypothesis state machine drives RefreshingCache against a simple model of its contract.

Steps: data changes, loader failures, clock jumps (TTL, negative TTL, maximum staleness, the
periodic full reload), peeks, gets, invalidations, full reloads and concurrent misses whose first
caller is cancelled. Every read is checked against the model, and so are the counters.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vochi_crm_client import NOT_LOADED, CacheSettings, LoadError, RefreshingCache
from vochi_crm_client.testing import FakeClock, settle

KEYS = st.sampled_from(["a", "b", "c"])
VALUES = st.sampled_from(["v1", "v2", None])
TTL, NEGATIVE_TTL, MAX_STALE, RETRY, REFRESH = 30, 10, 120, 5, 100
SETTINGS = CacheSettings(
    refresh_interval=REFRESH,
    refresh_jitter=0.0,
    ttl=TTL,
    ttl_jitter=0.0,
    negative_ttl=NEGATIVE_TTL,
    max_staleness=MAX_STALE,
    retry_interval=RETRY,
    sweep_interval=1.0,
)


@dataclass(frozen=True)
class ModelEntry:
    value: str | None
    loaded_at: float
    retry_at: float

    @property
    def fresh_until(self) -> float:
        return self.loaded_at + (NEGATIVE_TTL if self.value is None else TTL)

    @property
    def expires_at(self) -> float:
        return self.loaded_at + (NEGATIVE_TTL if self.value is None else MAX_STALE)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.db: dict[str, str] = {}
        self.failing = False
        self.gate: asyncio.Event | None = None
        self.cache: RefreshingCache[str, str] = RefreshingCache(
            load_one=self._load_one,
            load_all=self._load_all,
            settings=SETTINGS,
            clock=self.clock,
            sleep=self.clock.sleep,
        )
        self.model: dict[str, ModelEntry] = {}
        self.next_refresh = float(REFRESH)
        self.counts = dict.fromkeys(
            (
                "hits",
                "misses",
                "stale_hits",
                "negative_hits",
                "loads",
                "load_errors",
                "invalidations",
                "full_reloads",
                "full_reload_errors",
            ),
            0,
        )
        self.closing = asyncio.Event()
        self.host = self.loop.create_task(self._host())
        self._run(settle())

    # -- plumbing --------------------------------------------------------------------------

    async def _host(self) -> None:
        async with self.cache:
            await self.closing.wait()

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.closing.set()
        self._run(self.host)
        self.loop.close()

    async def _load_one(self, key: str) -> str | None:
        value, failing = self.db.get(key), self.failing
        if self.gate is not None:
            await self.gate.wait()
        if failing:
            raise ConnectionError("down")
        return value

    async def _load_all(self) -> dict[str, str]:
        if self.failing:
            raise ConnectionError("down")
        return dict(self.db)

    # -- the model -------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock()

    def _model_load(self, key: str) -> str | None:
        """One per-key load at ``now``: store the result, or count the failure."""
        self.counts["loads"] += 1
        if self.failing:
            self.counts["load_errors"] += 1
            entry = self.model.get(key)
            if entry is not None:
                self.model[key] = replace(entry, retry_at=self.now + RETRY)
            raise LoadError("down")
        value = self.db.get(key)
        self.model[key] = ModelEntry(value, self.now, self.now)
        return value

    def _model_full_reload(self) -> None:
        self.counts["loads"] += 1
        if self.failing:
            self.counts["load_errors"] += 1
            self.counts["full_reload_errors"] += 1
            return
        self.counts["full_reloads"] += 1
        kept = {k: e for k, e in self.model.items() if e.value is None and k not in self.db}
        self.model = kept | {k: ModelEntry(v, self.now, self.now) for k, v in self.db.items()}

    def _model_sweep(self) -> None:
        self.model = {k: e for k, e in self.model.items() if self.now < e.expires_at}

    def _model_read(self, key: str) -> object:
        """What a synchronous read returns, with its side effects on the model."""
        entry = self.model.get(key)
        if entry is None:
            self.counts["misses"] += 1
            return NOT_LOADED
        if entry.value is None:
            self.counts["negative_hits"] += 1
            return None
        if self.now < entry.fresh_until:
            self.counts["hits"] += 1
            return entry.value
        self.counts["stale_hits"] += 1
        if self.now >= entry.retry_at:
            with contextlib.suppress(LoadError):
                self._model_load(key)  # the background revalidation
        return entry.value

    # -- rules -----------------------------------------------------------------------------

    @rule(key=KEYS, value=VALUES)
    def write(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.pop(key, None)
        else:
            self.db[key] = value

    @rule(failing=st.booleans())
    def set_failing(self, failing: bool) -> None:
        self.failing = failing

    @rule(seconds=st.sampled_from([1, 4, 5, 9, 10, 29, 30, 31, 60, 100, 121]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self._run(settle())
        if self.now >= self.next_refresh:
            self._model_full_reload()
            self.next_refresh = self.now + REFRESH
        self._model_sweep()

    @rule(key=KEYS)
    def peek(self, key: str) -> None:
        got = self.cache.peek(key)
        self._run(settle())
        assert got == self._model_read(key)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        try:
            got: object = self._run(self.cache.get(key))
        except LoadError:
            got = LoadError
        self._run(settle())
        expected = self._model_read(key)
        if expected is NOT_LOADED:
            try:
                expected = self._model_load(key)
            except LoadError:
                expected = LoadError
        assert got == expected

    @precondition(lambda self: len(self.model) < 3)
    @rule(key=KEYS, waiters=st.integers(min_value=2, max_value=6))
    def concurrent_misses_with_the_first_cancelled(self, key: str, waiters: int) -> None:
        if key in self.model:
            return
        self.gate = asyncio.Event()
        tasks = [self.loop.create_task(self.cache.get(key)) for _ in range(waiters)]
        self._run(settle())
        tasks[0].cancel()
        self._run(settle())
        self.gate.set()
        self.gate = None
        results = self._run(asyncio.gather(*tasks, return_exceptions=True))
        self._run(settle())
        self.counts["misses"] += waiters
        try:
            expected: object = self._model_load(key)
        except LoadError:
            expected = LoadError
        assert isinstance(results[0], asyncio.CancelledError)
        for result in results[1:]:
            assert (type(result) if isinstance(result, LoadError) else result) == expected

    @rule(key=KEYS)
    def invalidate(self, key: str) -> None:
        self.cache.invalidate(key)
        self._run(settle())
        self.counts["invalidations"] += 1
        entry = self.model.pop(key, None)
        if entry is not None and entry.value is not None:
            with contextlib.suppress(LoadError):
                self._model_load(key)

    @rule()
    def reload_all(self) -> None:
        try:
            self._run(self.cache.reload_all())
            failed = False
        except LoadError:
            failed = True
        self._run(settle())
        assert failed == self.failing
        self._model_full_reload()

    @rule()
    def invalidate_all(self) -> None:
        self.cache.invalidate_all()
        self._run(settle())
        self.counts["invalidations"] += 1
        self.model = {}
        self._model_full_reload()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def counters_and_sizes_match_the_model(self) -> None:
        stats = self.cache.stats()
        assert {k: stats[k] for k in self.counts} == self.counts
        negatives = sum(1 for e in self.model.values() if e.value is None)
        assert stats["negative_size"] == negatives
        assert stats["size"] == len(self.model) - negatives
        assert stats["inflight"] == 0


CacheMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None, print_blob=True
)
test_cache_state_machine = CacheMachine.TestCase
