"""A generic refreshing cache: lock-free O(1) reads and writes, bounded, single-flight loads.

The enablement matrix and the RetailCRM service's per-enterprise config cache are both this
class with different loaders. Public names (re-exported by ``vochi_crm_client``)::

    CacheSettings(*, refresh_interval=240.0, refresh_jitter=0.15, ttl=90.0, ttl_jitter=0.25,
                  negative_ttl=15.0, max_staleness=1800.0, retry_interval=5.0,
                  load_timeout=10.0, sweep_interval=1.0,
                  max_entries=200_000, max_negative=10_000)        # frozen, validated

    RefreshingCache[K, V](*, load_one: Callable[[K], Awaitable[V | None]],
                          load_all: Callable[[], Awaitable[Mapping[K, V]]] | None = None,
                          settings: CacheSettings = CacheSettings(), name: str = "cache",
                          describe_key: Callable[[K], str] = repr,
                          clock=time.monotonic, sleep=asyncio.sleep, rng=random.Random())
        async with cache: ...                 # owns the sweeper and the periodic full reload
        cache.peek(key) -> V | None | NOT_LOADED   # sync, O(1), never blocks, never loads a miss
        cache.lookup(key) -> Lookup[V]             # same, with the LookupStatus spelled out
        await cache.get(key) -> V | None           # loads a miss (single-flight); raises LoadError
        await cache.reload_all() -> None           # full reload; raises LoadError, keeps old data
        cache.invalidate(key, *, reload=True)      # drop one key (refetched in the background)
        cache.invalidate_if(predicate) -> int      # drop every (key, value) the predicate accepts
        cache.invalidate_negatives() -> int        # drop every negative entry, O(1)
        cache.invalidate_all()                     # drop everything; full reload in the background
        cache.stats() -> dict                      # JSON-serialisable; keys: CACHE_STATS_KEYS

``load_one`` returns the value, or None for "no such key", which is cached negatively for
``negative_ttl``. ``V`` must never be None itself. ``load_all`` returns every existing key.

Freshness: an entry is fresh for ``ttl`` (jittered per entry), then stale: still served, and the
first stale read schedules one background revalidation (a failed one is retried no sooner than
``retry_interval``). After ``max_staleness`` without a successful load the entry is dropped.
Freshness is evaluated by a background sweeper every ``sweep_interval``, not on every read: the
hit path is then one dict lookup and a counter, with no clock call (see benchmarks/).

Cost and bounds: storing, invalidating or expiring one key is O(1) (O(log n) for its deadline in
the sweeper's heap): the maps are updated in place, never copied, so a flood of distinct keys
(junk tokens) cannot make each insert slower than the last. At most ``max_entries`` values and
``max_negative`` negative entries are kept; beyond either bound the entry stored longest ago is
evicted (a later read loads it again). ``invalidate_negatives`` and ``invalidate_all`` drop their
entries at once, whatever their number; only ``invalidate_if`` and a full reload walk the entries.

Consistency: a load's result is stored only if no invalidation of its key (or of everything)
happened after the load started; a full reload keeps, for keys invalidated while it ran, whatever
the per-key path stored since. ``reload_all`` never joins a reload that started before the call:
callers arriving during a running reload share the single next one (debounced, none dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar

from ._backoff import SupportsRandom
from ._exceptions import LoadError, LoadTimeout, StateError
from ._tasks import BackgroundTasks

__all__ = [
    "CACHE_STATS_KEYS",
    "NOT_LOADED",
    "CacheSettings",
    "CacheState",
    "Lookup",
    "LookupStatus",
    "NotLoaded",
    "RefreshingCache",
]

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Clock: TypeAlias = Callable[[], float]
Sleep: TypeAlias = Callable[[float], Awaitable[None]]


class _NotLoadedType(enum.Enum):
    NOT_LOADED = "NOT_LOADED"

    def __repr__(self) -> str:
        return "NOT_LOADED"


NOT_LOADED: Final = _NotLoadedType.NOT_LOADED
"""Sentinel of the synchronous reads: nothing is known about the key yet (not a negative)."""

NotLoaded: TypeAlias = Literal[_NotLoadedType.NOT_LOADED]


class LookupStatus(enum.Enum):
    HIT = "hit"
    STALE = "stale"
    NEGATIVE = "negative"
    MISS = "miss"


class CacheState(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


CACHE_STATS_KEYS: Final = (
    "name",
    "state",
    "hits",
    "misses",
    "stale_hits",
    "negative_hits",
    "loads",
    "load_errors",
    "load_time",
    "invalidations",
    "full_reloads",
    "full_reload_errors",
    "size",
    "negative_size",
    "inflight",
    "snapshot_age",
)


@dataclass(frozen=True, slots=True)
class Lookup(Generic[V]):
    """What a synchronous read found: ``value`` is None for NEGATIVE and MISS."""

    status: LookupStatus
    value: V | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    """Tunables of a RefreshingCache; all durations in seconds, jitters as fractions."""

    refresh_interval: float = 240.0
    refresh_jitter: float = 0.15
    ttl: float = 90.0
    ttl_jitter: float = 0.25
    negative_ttl: float = 15.0
    max_staleness: float = 1800.0
    retry_interval: float = 5.0
    load_timeout: float = 10.0
    sweep_interval: float = 1.0
    max_entries: int = 200_000
    max_negative: int = 10_000

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"CacheSettings.{name} must be a finite number >= 0: {value!r}")
        for name in ("refresh_interval", "ttl", "negative_ttl", "load_timeout", "sweep_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheSettings.{name} must be > 0")
        for name in ("refresh_jitter", "ttl_jitter"):
            if getattr(self, name) >= 1:
                raise ValueError(f"CacheSettings.{name} is a fraction and must be < 1")
        for name in ("max_entries", "max_negative"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheSettings.{name} must be an integer >= 1: {value!r}")
        if self.max_staleness < self.ttl * (1 + self.ttl_jitter):
            raise ValueError("CacheSettings.max_staleness must be >= the longest entry TTL")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V | None  # None: the key does not exist (a negative entry)
    loaded_at: float
    fresh_until: float
    expires_at: float
    retry_at: float  # earliest background revalidation (pushed back after a failure)


class _HotPath(Generic[K, V]):
    """The fresh values and the hit counter, in closure cells.

    A closure is used because reading a cell is cheaper than attributes of ``self``, and a
    subscript (specialised for dicts by the interpreter) is cheaper than calling ``get``; misses
    pay for a KeyError instead, and they leave the hot path anyway. Measured per hit: ~73 ns
    this way, ~79 ns with ``get``, ~88 ns as a method, against ~27 ns for a bare ``dict.get``.
    The Python call itself is most of the difference.
    """

    def __init__(self, slow: Callable[[K], V | NotLoaded | None]) -> None:
        fresh: dict[K, V] = {}
        hits = 0

        def peek(key: K) -> V | NotLoaded | None:
            nonlocal hits
            try:
                value = fresh[key]
            except KeyError:
                return slow(key)
            hits += 1
            return value

        def publish(new_fresh: dict[K, V]) -> None:
            nonlocal fresh
            fresh = new_fresh

        def hit_count() -> int:
            return hits

        self.peek = peek
        self.publish = publish
        self.hits = hit_count


class _Reload:
    """One full reload, awaited by every caller that arrived before it started."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.done.add_done_callback(_retrieve)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A background load nobody awaits must not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class RefreshingCache(Generic[K, V]):
    """A snapshot cache with per-key and full loaders; see the module docstring."""

    def __init__(
        self,
        *,
        load_one: Callable[[K], Awaitable[V | None]],
        load_all: Callable[[], Awaitable[Mapping[K, V]]] | None = None,
        settings: CacheSettings | None = None,
        name: str = "cache",
        describe_key: Callable[[K], str] = repr,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: SupportsRandom | None = None,
    ) -> None:
        self._load_one = load_one
        self._load_all = load_all
        self.settings = settings if settings is not None else CacheSettings()
        self.name = name
        self._describe = describe_key
        self._clock = clock
        self._sleep = sleep
        self._rng: SupportsRandom = rng if rng is not None else random.Random()
        self._state = CacheState.UNOPENED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks = BackgroundTasks(f"cache {name}", logger=logger)

        # Values and negatives are kept apart so that a flood of junk keys, each cached
        # negatively, evicts only other negatives. Both are ordered by when they were stored.
        self._values: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._negatives: OrderedDict[K, _Entry[V]] = OrderedDict()
        # The hot path's dict of fresh values, updated in place alongside ``_values``.
        self._fresh: dict[K, V] = {}
        self._hot: _HotPath[K, V] = _HotPath(self._peek_slow)
        self._hot.publish(self._fresh)
        self.peek: Callable[[K], V | NotLoaded | None] = self._hot.peek
        # The sweeper's deadlines: (when, seq, key, entry); an item whose entry is no longer
        # the key's current one is skipped when it comes up.
        self._deadlines: list[tuple[float, int, K, _Entry[V]]] = []
        self._seq = itertools.count()

        self._inflight: dict[K, asyncio.Future[V | None]] = {}
        self._epoch = 0  # bumped by invalidate_all: older loads must not be stored
        self._running: _Reload | None = None
        self._pending: _Reload | None = None
        self._dirty: set[K] = set()  # keys invalidated while the running full reload runs
        self._last_full_reload: float | None = None

        self._misses = 0
        self._stale_hits = 0
        self._negative_hits = 0
        self._loads = 0
        self._load_errors = 0
        self._load_time = 0.0
        self._invalidations = 0
        self._full_reloads = 0
        self._full_reload_errors = 0

    def __repr__(self) -> str:
        size = len(self._values) + len(self._negatives)
        return f"<RefreshingCache {self.name!r} {self._state.value} size={size}>"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def state(self) -> CacheState:
        return self._state

    async def __aenter__(self) -> RefreshingCache[K, V]:
        if self._state is not CacheState.UNOPENED:
            raise StateError(f"cache {self.name!r} can be opened only once")
        # Kept so that the synchronous methods (invalidate, peek's revalidation) also work when
        # called from code that runs outside the loop's current task.
        self._loop = asyncio.get_running_loop()
        self._tasks.open()
        self._state = CacheState.OPEN
        self._tasks.start(self._sweep_forever, name=f"cache-{self.name}-sweeper")
        if self._load_all is not None:
            self._tasks.start(self._refresh_forever, name=f"cache-{self.name}-refresh")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Nothing in flight is worth waiting for: a load's only effect is on this cache.
        self._state = CacheState.CLOSED
        await self._tasks.close()
        self._fail_waiters(StateError(f"cache {self.name!r} closed"))

    def _require_open(self) -> None:
        if self._state is not CacheState.OPEN:
            raise StateError(f"cache {self.name!r} is {self._state.value}; use `async with`")

    def _fail_waiters(self, error: BaseException) -> None:
        futures: list[asyncio.Future[Any]] = list(self._inflight.values())
        futures += [r.done for r in (self._running, self._pending) if r is not None]
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)
        self._inflight.clear()
        self._running = self._pending = None

    # -- reads -----------------------------------------------------------------------------

    def _entry(self, key: K) -> _Entry[V] | None:
        entry = self._values.get(key)
        return entry if entry is not None else self._negatives.get(key)

    def _peek_slow(self, key: K) -> V | NotLoaded | None:
        entry = self._entry(key)
        if entry is None:
            self._misses += 1
            return NOT_LOADED
        if entry.value is None:
            self._negative_hits += 1
            return None
        self._stale_hits += 1
        self._revalidate(key, entry)
        return entry.value

    def lookup(self, key: K) -> Lookup[V]:
        """Like ``peek``, with the outcome spelled out (for logs, admin views, tests)."""
        stale_before = self._stale_hits
        value = self.peek(key)
        if value is NOT_LOADED:
            return Lookup(LookupStatus.MISS, None)
        if value is None:
            return Lookup(LookupStatus.NEGATIVE, None)
        status = LookupStatus.STALE if self._stale_hits != stale_before else LookupStatus.HIT
        return Lookup(status, value)

    async def get(self, key: K) -> V | None:
        """The cached value (stale ones included), loading a miss; None if the key does not exist.

        Concurrent misses of one key share one load; a caller's cancellation leaves the load
        running for the others; a failed load raises LoadError in every waiter.
        """
        value = self.peek(key)
        if value is not NOT_LOADED:
            return value
        self._require_open()
        fut = self._inflight.get(key)
        if fut is None:
            fut = self._start_load(key)
        return await asyncio.shield(fut)

    # -- per-key loads ---------------------------------------------------------------------

    def _revalidate(self, key: K, entry: _Entry[V]) -> None:
        open_ = self._state is CacheState.OPEN
        if open_ and key not in self._inflight and self._clock() >= entry.retry_at:
            self._start_load(key)

    def _start_load(self, key: K) -> asyncio.Future[V | None]:
        assert self._loop is not None
        fut: asyncio.Future[V | None] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        self._inflight[key] = fut
        self._tasks.start(self._run_load, key, fut, name=f"cache-{self.name}-load")
        return fut

    async def _run_load(self, key: K, fut: asyncio.Future[V | None]) -> None:
        started = self._clock()
        self._loads += 1
        try:
            async with asyncio.timeout(self.settings.load_timeout):
                value = await self._load_one(key)
        except asyncio.CancelledError:
            if not fut.done():
                fut.set_exception(StateError(f"cache {self.name!r} closed"))
            raise
        except Exception as exc:
            self._finish_load_error(key, fut, exc)
        else:
            self._load_time += self._clock() - started
            if self._inflight.get(key) is fut:
                del self._inflight[key]
                self._store(key, self._new_entry(value, started))
            fut.set_result(value)

    def _finish_load_error(self, key: K, fut: asyncio.Future[V | None], exc: Exception) -> None:
        self._load_errors += 1
        what = self._describe(key)
        logger.warning("cache.load_failed cache=%s key=%s error=%s", self.name, what, _kind(exc))
        if self._inflight.get(key) is fut:
            del self._inflight[key]
            entry = self._entry(key)
            if entry is not None:
                retry_at = self._clock() + self.settings.retry_interval
                self._store(key, _with_retry(entry, retry_at))
        error = _translate(exc, f"cache {self.name!r}: loading {what} failed")
        fut.set_exception(error)

    def _new_entry(self, value: V | None, loaded_at: float) -> _Entry[V]:
        s = self.settings
        if value is None:
            until = loaded_at + s.negative_ttl
            return _Entry(None, loaded_at, until, until, loaded_at)
        ttl = s.ttl * (1 + s.ttl_jitter * (2 * self._rng.random() - 1))
        return _Entry(value, loaded_at, loaded_at + ttl, loaded_at + s.max_staleness, loaded_at)

    # -- full reloads ----------------------------------------------------------------------

    async def reload_all(self) -> None:
        """Reload every key with ``load_all`` and swap the snapshot; raises LoadError on failure.

        Returns once a reload that started after this call has finished (or was superseded by
        ``invalidate_all``); the old snapshot stays in place when it fails.
        """
        if self._load_all is None:
            raise StateError(f"cache {self.name!r} has no load_all")
        self._require_open()
        reload = self._request_reload()
        await asyncio.shield(reload.done)

    def _request_reload(self) -> _Reload:
        """The next reload to start (shared by everyone asking while another one runs)."""
        reload = self._pending
        if reload is None:
            assert self._loop is not None
            reload = self._pending = _Reload(self._loop)
            if self._running is None:
                self._start_pending_reload()
        return reload

    def _start_pending_reload(self) -> None:
        reload, self._pending = self._pending, None
        assert reload is not None
        self._running = reload
        self._dirty = set()
        self._tasks.start(self._run_reload, reload, name=f"cache-{self.name}-reload")

    async def _run_reload(self, reload: _Reload) -> None:
        assert self._load_all is not None
        started, epoch = self._clock(), self._epoch
        self._loads += 1
        try:
            async with asyncio.timeout(self.settings.load_timeout):
                mapping = await self._load_all()
        except asyncio.CancelledError:
            if not reload.done.done():
                reload.done.set_exception(StateError(f"cache {self.name!r} closed"))
            raise
        except Exception as exc:
            self._load_errors += 1
            self._full_reload_errors += 1
            logger.warning("cache.reload_failed cache=%s error=%s", self.name, _kind(exc))
            reload.done.set_exception(_translate(exc, f"cache {self.name!r}: full reload failed"))
        else:
            self._load_time += self._clock() - started
            if epoch == self._epoch:
                self._install(mapping, started)
            reload.done.set_result(None)
        self._running = None
        if self._pending is not None and self._state is CacheState.OPEN:
            self._start_pending_reload()

    def _install(self, mapping: Mapping[K, V], started: float) -> None:
        kept: list[tuple[K, _Entry[V]]] = []
        for key, entry in itertools.chain(self._negatives.items(), self._values.items()):
            # Negatives of keys absent from the reload stay true; dirty keys were changed after
            # the reload read them, so the per-key path's value (if any) wins.
            if key in self._dirty or (entry.value is None and key not in mapping):
                kept.append((key, entry))
        self._clear()
        for key, entry in kept:
            self._store(key, entry)
        for key, value in mapping.items():
            if key not in self._dirty and value is not None:
                self._store(key, self._new_entry(value, started))
        self._full_reloads += 1
        self._last_full_reload = started

    # -- invalidation ----------------------------------------------------------------------

    def invalidate(self, key: K, *, reload: bool = True) -> None:
        """Forget ``key`` now; with ``reload``, refetch a known value in the background."""
        self._invalidations += 1
        self._inflight.pop(key, None)  # its waiters still get its result; it is not stored
        if self._running is not None:
            self._dirty.add(key)
        entry = self._drop(key)
        known = entry is not None and entry.value is not None
        if reload and known and self._state is CacheState.OPEN:
            self._start_load(key)

    def invalidate_if(self, predicate: Callable[[K, V | None], bool]) -> int:
        """Forget every entry for which ``predicate(key, value)`` holds (value None: negative).

        This walks every entry; to forget all negatives, ``invalidate_negatives`` costs O(1).
        """
        entries = itertools.chain(self._values.items(), self._negatives.items())
        doomed = [k for k, e in entries if predicate(k, e.value)]
        for key in doomed:
            self.invalidate(key, reload=False)
        return len(doomed)

    def invalidate_negatives(self) -> int:
        """Forget every negative entry at once (O(1) however many); returns how many."""
        dropped = len(self._negatives)
        self._invalidations += dropped
        if self._running is not None and dropped:
            # What the running reload read may predate their creation: not reinstated.
            self._dirty.update(self._negatives)
        self._negatives = OrderedDict()
        return dropped

    def invalidate_all(self) -> None:
        """Forget everything; loads in flight are not stored; a full reload starts if possible."""
        self._invalidations += 1
        self._epoch += 1
        self._inflight.clear()
        self._clear()
        if self._load_all is not None and self._state is CacheState.OPEN:
            self._request_reload()

    # -- snapshot maintenance --------------------------------------------------------------

    def _store(self, key: K, entry: _Entry[V]) -> None:
        """Make ``entry`` the key's current one, in O(1) (plus its deadline in the heap)."""
        if entry.value is None:
            if self._values.pop(key, None) is not None:
                self._fresh.pop(key, None)
            store, bound = self._negatives, self.settings.max_negative
            self._schedule(entry.expires_at, key, entry)
        else:
            self._negatives.pop(key, None)
            store, bound = self._values, self.settings.max_entries
            if self._clock() < entry.fresh_until:
                self._fresh[key] = entry.value
                self._schedule(entry.fresh_until, key, entry)
            else:
                self._fresh.pop(key, None)
                self._schedule(entry.expires_at, key, entry)
        store[key] = entry
        store.move_to_end(key)
        while len(store) > bound:
            evicted, _ = store.popitem(last=False)
            if store is self._values:
                self._fresh.pop(evicted, None)

    def _drop(self, key: K) -> _Entry[V] | None:
        entry = self._values.pop(key, None)
        if entry is not None:
            self._fresh.pop(key, None)
            return entry
        return self._negatives.pop(key, None)

    def _clear(self) -> None:
        self._values = OrderedDict()
        self._negatives = OrderedDict()
        self._fresh = {}
        self._hot.publish(self._fresh)
        self._deadlines = []

    def _schedule(self, when: float, key: K, entry: _Entry[V]) -> None:
        heap = self._deadlines
        heapq.heappush(heap, (when, next(self._seq), key, entry))
        if len(heap) > 2 * (len(self._values) + len(self._negatives)) + 1024:
            self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Rebuild the heap from the current entries (dropping replaced ones): amortised O(1)."""
        now = self._clock()
        heap = []
        for key, entry in itertools.chain(self._values.items(), self._negatives.items()):
            fresh = entry.value is not None and now < entry.fresh_until
            heap.append((entry.fresh_until if fresh else entry.expires_at, 0, key, entry))
        heap = [(when, next(self._seq), key, entry) for when, _, key, entry in heap]
        heapq.heapify(heap)
        self._deadlines = heap

    def _sweep(self) -> None:
        """Demote entries past their TTL to stale and drop expired ones (only those)."""
        now = self._clock()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, key, entry = heapq.heappop(heap)
            store = self._negatives if entry.value is None else self._values
            if store.get(key) is not entry:
                continue  # replaced, dropped or evicted since
            if now < entry.expires_at:  # past its TTL: stale, served until it expires
                self._fresh.pop(key, None)
                heapq.heappush(heap, (entry.expires_at, next(self._seq), key, entry))
            else:
                self._drop(key)

    async def _sweep_forever(self) -> None:
        while True:
            await self._sleep(self.settings.sweep_interval)
            self._sweep()

    async def _refresh_forever(self) -> None:
        s = self.settings
        while True:
            jitter = s.refresh_jitter * (2 * self._rng.random() - 1)
            await self._sleep(s.refresh_interval * (1 + jitter))
            with contextlib.suppress(LoadError):  # counted and logged; the old snapshot stays
                await self.reload_all()

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable counters; ``load_time`` in seconds, ``snapshot_age`` None if never."""
        last = self._last_full_reload
        return {
            "name": self.name,
            "state": self._state.value,
            "hits": self._hot.hits(),
            "misses": self._misses,
            "stale_hits": self._stale_hits,
            "negative_hits": self._negative_hits,
            "loads": self._loads,
            "load_errors": self._load_errors,
            "load_time": round(self._load_time, 6),
            "invalidations": self._invalidations,
            "full_reloads": self._full_reloads,
            "full_reload_errors": self._full_reload_errors,
            "size": len(self._values),
            "negative_size": len(self._negatives),
            "inflight": len(self._inflight) + (self._running is not None),
            "snapshot_age": None if last is None else round(self._clock() - last, 3),
        }


def _with_retry(entry: _Entry[V], retry_at: float) -> _Entry[V]:
    return _Entry(entry.value, entry.loaded_at, entry.fresh_until, entry.expires_at, retry_at)


def _kind(exc: BaseException) -> str:
    # Only the class: messages of driver errors can carry DSNs or keys.
    return type(exc).__name__


def _translate(exc: Exception, message: str) -> LoadError:
    if isinstance(exc, LoadError):
        return exc
    error: LoadError
    if isinstance(exc, TimeoutError):
        error = LoadTimeout(message + " (timed out)")
    else:
        error = LoadError(f"{message}: {_kind(exc)}")
    error.__cause__ = exc
    return error
