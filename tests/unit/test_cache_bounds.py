"""RefreshingCache under a flood of distinct keys: bounded, O(1) work per insert, and forgetting
every negative entry at once costs no work per entry.

Work is counted, not timed: keys count how often they are hashed, which is what any copy or
rebuild of a map does once per entry it holds.
"""

from __future__ import annotations

from vochi_crm_client import NOT_LOADED, CacheSettings, RefreshingCache
from vochi_crm_client.testing import FakeClock, settle

HASHES = 0


class Key:
    """A cache key that counts how often it is hashed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        global HASHES
        HASHES += 1
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.name == self.name


def _hashes() -> int:
    return HASHES


SETTINGS = CacheSettings(
    ttl=60.0, ttl_jitter=0.0, negative_ttl=30.0, max_entries=500, max_negative=1000
)


def _cache(clock: FakeClock, known: dict[str, str]) -> RefreshingCache[Key, str]:
    async def load_one(key: Key) -> str | None:
        return known.get(key.name)

    return RefreshingCache(load_one=load_one, settings=SETTINGS, clock=clock, sleep=clock.sleep)


async def test_inserting_into_a_full_cache_costs_a_constant_amount_of_work() -> None:
    clock = FakeClock()
    async with _cache(clock, {}) as cache:
        for i in range(3000):  # a flood of junk: every key is unknown, the cache is full
            await cache.get(Key(f"junk-{i}"))
        before = _hashes()
        for i in range(1000):
            await cache.get(Key(f"late-{i}"))
        per_insert = (_hashes() - before) / 1000
        # Copying or rescanning the map on each insert would hash ~1000 keys per insert; in
        # place it is a handful (lookups, the store, the eviction, an occasional compaction).
        assert per_insert < 30
        assert cache.stats()["negative_size"] == SETTINGS.max_negative


async def test_values_and_negatives_have_separate_bounds_and_evict_the_oldest() -> None:
    clock = FakeClock()
    known = {f"k{i}": f"v{i}" for i in range(600)}
    async with _cache(clock, known) as cache:
        for i in range(600):
            assert await cache.get(Key(f"k{i}")) == f"v{i}"
        for i in range(5000):
            assert await cache.get(Key(f"junk-{i}")) is None
        stats = cache.stats()
        assert stats["size"] == SETTINGS.max_entries
        assert stats["negative_size"] == SETTINGS.max_negative
        # The junk evicted only junk; the oldest values made room for the newest ones.
        assert cache.peek(Key("k599")) == "v599"
        assert cache.peek(Key("k0")) is NOT_LOADED
        assert cache.peek(Key("junk-4999")) is None
        assert cache.peek(Key("junk-0")) is NOT_LOADED
        assert await cache.get(Key("k0")) == "v0"  # evicted is a miss: loaded again


async def test_forgetting_every_negative_costs_no_work_per_entry() -> None:
    clock = FakeClock()
    async with _cache(clock, {"real": "0367"}) as cache:
        assert await cache.get(Key("real")) == "0367"
        for i in range(1000):
            await cache.get(Key(f"junk-{i}"))
        before = _hashes()
        for _ in range(50):  # repeated "*" changes
            cache.invalidate_negatives()
        assert _hashes() - before == 0
        assert cache.stats()["negative_size"] == 0
        assert cache.peek(Key("real")) == "0367"
        assert cache.peek(Key("junk-1")) is NOT_LOADED


async def test_expiry_costs_a_constant_amount_of_work_per_entry() -> None:
    clock = FakeClock()
    async with _cache(clock, {"real": "0367"}) as cache:
        await cache.get(Key("real"))
        for second in range(20):  # junk arrives all the time: something expires every second
            for i in range(50):
                await cache.get(Key(f"junk-{second}-{i}"))
            clock.advance(1)
            await settle()
        before = _hashes()
        for _ in range(40):  # all of it expires (30 s after it came), one sweep a second
            clock.advance(1)
            await settle()
        # Rebuilding the map whenever something is due would hash every live key each second.
        assert (_hashes() - before) / 1000 < 6
        assert cache.stats()["negative_size"] == 0
        assert cache.peek(Key("real")) == "0367"
