"""The enablement matrix: which integrations each enterprise has on, and whose token is whose.

Public names (re-exported by ``vochi_crm_client``)::

    EnablementMatrix(*, dsn: str, cache: CacheSettings = CacheSettings(),
                     listener: ListenerSettings = ListenerSettings(),
                     listen: bool = True, preload: bool = True,
                     pool_max_size: int = 2, connect_timeout: float = 10.0,
                     clock=time.monotonic, sleep=asyncio.sleep, rng=random.Random())
        async with matrix: ...
        matrix.lookup(number: str) -> frozenset[str] | NotLoaded | None   # sync hot path
        matrix.lookup_token(token: str) -> str | NotLoaded | None         # sync hot path
        await matrix.integrations_for(number: str) -> frozenset[str]      # frozenset() if unknown
        await matrix.resolve_token(token: str) -> str | None              # None if unknown
        await matrix.refresh() -> None                                    # full reload now
        matrix.invalidate(number: str) -> None
        matrix.listener -> ChangeListener | None
        matrix.stats() -> dict    # {"state", "queries", "preloaded", "matrix": cache stats,
                                  #  "tokens": cache stats, "listener": listener stats | None}

The synchronous lookups return the value (a hit, possibly stale: stale reads schedule a
background revalidation), None when the enterprise/token is known not to exist (negative, for
``negative_ttl``), or ``NOT_LOADED`` when nothing is known yet: then await the async variant,
which loads it (one query however many callers wait). They never block and never raise, and
may be pre-bound (``lookup = matrix.lookup``): they always read the current snapshot.

"Enabled" is exactly the platform's rule: ``enterprises.active`` and
``integrations_config-><key>->>'enabled' = 'true'``, for every top-level key whose value is an
object (retailcrm, uon, ms, bitrix24, ...); ``enabled_sql`` states it once for every query of the
system that needs it. A token is ``name2``, ``secret`` or ``number``, in that order of precedence
when two enterprises would claim the same string; ``enterprise_for_token`` is that lookup for
anyone who resolves a single token. ``mask_token`` is the system's one masking rule.

Coherence: ``LISTEN integrations_changed`` (see ``_listener``) invalidates the enterprise named
in each notification (and, for ``"*"`` changes, every token of it and every negative token), and
runs a full reload after every (re)connect. With ``preload`` the first full reload happens in
``__aenter__``; a failure there is logged and counted, not raised (the matrix then fills per key
and the listener keeps retrying).
"""

from __future__ import annotations

import asyncio
import enum
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import asyncpg

from ._backoff import SupportsRandom
from ._cache import CacheSettings, CacheState, Clock, NotLoaded, RefreshingCache, Sleep
from ._exceptions import LoadError, StateError
from ._listener import Change, ChangeListener, ListenerSettings, ListenerState

__all__ = [
    "EnablementMatrix",
    "MatrixState",
    "enabled_sql",
    "enterprise_for_token",
    "mask_token",
]

_SQL_OPERAND = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*( -> '[A-Za-z0-9_]+')?")


def enabled_sql(active: str, config: str) -> str:
    """The platform's "enabled" rule as a boolean SQL expression, never NULL.

    ``active`` names the ``enterprises.active`` column (``"e.active"``); ``config`` the JSON object
    of one integration (``"e.integrations_config -> 'retailcrm'"``, or a ``jsonb_each`` value).
    Both are SQL written by the caller, checked to be a plain column reference (optionally
    followed by ``-> 'key'``), never user input.
    """
    for operand in (active, config):
        if not _SQL_OPERAND.fullmatch(operand):
            raise ValueError(f"not a column reference: {operand!r}")
    return (
        f"COALESCE({active} IS TRUE AND jsonb_typeof({config}) = 'object'"
        f" AND {config} ->> 'enabled' = 'true', false)"
    )


# Built from constants only (enabled_sql checks its operands).
_ENABLED_SQL = f"""
SELECT e.number,
       COALESCE(array_agg(c.key ORDER BY c.key) FILTER (WHERE c.key IS NOT NULL), '{{}}') AS enabled
  FROM enterprises e
  LEFT JOIN LATERAL jsonb_each(
           CASE WHEN jsonb_typeof(e.integrations_config) = 'object'
                THEN e.integrations_config ELSE '{{}}'::jsonb END) AS c(key, value)
         ON {enabled_sql("e.active", "c.value")}
 -- WHERE
 GROUP BY e.number
"""  # noqa: S608
_ALL_ENABLED = _ENABLED_SQL
_ONE_ENABLED = _ENABLED_SQL.replace("-- WHERE", "WHERE e.number = $1")
_ALL_IDENTITIES = "SELECT number, name2, secret FROM enterprises"
_RESOLVE_ONE = """
SELECT number FROM enterprises
 WHERE name2 = $1 OR secret = $1 OR number = $1
 ORDER BY COALESCE(name2 = $1, false) DESC, COALESCE(secret = $1, false) DESC
 LIMIT 1
"""


class _Fetches(Protocol):
    async def fetchval(self, query: str, *args: Any) -> Any: ...


async def enterprise_for_token(conn: _Fetches, token: str) -> str | None:
    """The number of the enterprise a host ``Token`` names (``name2``, ``secret``, then
    ``number``), or None; ``conn`` is an asyncpg connection or pool."""
    number = await conn.fetchval(_RESOLVE_ONE, token)
    return None if number is None else str(number)


class MatrixState(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


def mask_token(token: str) -> str:
    """A secret fit for logs and screens: ``***``, plus its last 4 characters when it is long
    enough (16+) that they reveal little. The one masking rule of the whole system."""
    return "***" + token[-4:] if len(token) >= 16 else "***"


class EnablementMatrix:
    """enterprise number -> frozenset of enabled integrations, kept fresh from PostgreSQL."""

    def __init__(
        self,
        *,
        dsn: str,
        cache: CacheSettings | None = None,
        listener: ListenerSettings | None = None,
        listen: bool = True,
        preload: bool = True,
        pool_max_size: int = 2,
        connect_timeout: float = 10.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: SupportsRandom | None = None,
    ) -> None:
        if pool_max_size < 1:
            raise ValueError("pool_max_size must be >= 1")
        self._dsn = dsn
        self._preload = preload
        self._pool_max_size = pool_max_size
        self._connect_timeout = connect_timeout
        self._state = MatrixState.UNOPENED
        self._pool: Any = None
        self._queries = 0
        self._preloaded = False
        rng = rng if rng is not None else random.Random()
        common: dict[str, Any] = {"settings": cache, "clock": clock, "sleep": sleep, "rng": rng}
        self._numbers: RefreshingCache[str, frozenset[str]] = RefreshingCache(
            load_one=self._load_number, load_all=self._load_numbers, name="matrix", **common
        )
        self._tokens: RefreshingCache[str, str] = RefreshingCache(
            load_one=self._load_token,
            load_all=self._load_tokens,
            name="tokens",
            describe_key=mask_token,
            **common,
        )
        self._listener: ChangeListener | None = None
        if listen:
            self._listener = ChangeListener(
                dsn=dsn,
                on_change=self._on_change,
                on_reload=self.refresh,
                settings=listener,
                clock=clock,
                sleep=sleep,
                rng=rng,
            )
        # The hot paths are the caches' own closures: no extra call layer (see benchmarks/).
        self.lookup: Callable[[str], frozenset[str] | NotLoaded | None] = self._numbers.peek
        self.lookup_token: Callable[[str], str | NotLoaded | None] = self._tokens.peek

    def __repr__(self) -> str:
        return f"<EnablementMatrix {self._state.value} size={self._numbers.stats()['size']}>"

    @property
    def state(self) -> MatrixState:
        return self._state

    @property
    def listener(self) -> ChangeListener | None:
        return self._listener

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> EnablementMatrix:
        if self._state is not MatrixState.UNOPENED:
            raise StateError("an EnablementMatrix can be opened only once")
        # min_size=0: opening must not fail because the database is down right now.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_max_size,
            timeout=self._connect_timeout,
            server_settings={"application_name": "vochi-crm-matrix"},
        )
        try:
            await self._numbers.__aenter__()
            await self._tokens.__aenter__()
            if self._preload:
                await self._try_preload()
            if self._listener is not None:
                await self._listener.__aenter__()
        except BaseException:
            await self._close()
            raise
        self._state = MatrixState.OPEN
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _try_preload(self) -> None:
        try:
            await self.refresh()
        except LoadError:
            return  # counted and logged by the caches; lookups load per key meanwhile
        self._preloaded = True

    async def _close(self) -> None:
        self._state = MatrixState.CLOSED
        if self._listener is not None and self._listener.state is not ListenerState.IDLE:
            await self._listener.__aexit__(None, None, None)
        for cache in (self._tokens, self._numbers):
            if cache.state is CacheState.OPEN:
                await cache.__aexit__(None, None, None)
        if self._pool is not None:
            await self._pool.close()

    # -- lookups ---------------------------------------------------------------------------

    async def integrations_for(self, number: str) -> frozenset[str]:
        """The integrations on for ``number`` (empty if unknown); loads on a miss.

        Raises LoadError if it had to load and the database failed.
        """
        found = await self._numbers.get(number)
        return frozenset() if found is None else found

    async def resolve_token(self, token: str) -> str | None:
        """The enterprise number a Token header names, or None; loads on a miss."""
        return await self._tokens.get(token)

    async def refresh(self) -> None:
        """Reload the whole matrix and all tokens now (raises LoadError, keeping old data)."""
        results = await asyncio.gather(
            self._numbers.reload_all(), self._tokens.reload_all(), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def invalidate(self, number: str) -> None:
        """Forget what is known about ``number`` (and its tokens); refetched in the background."""
        self._on_change(Change(number, "*"))

    def _on_change(self, change: Change) -> None:
        number = change.enterprise_number
        self._numbers.invalidate(number)
        if change.integration_type == "*":
            # Inserts, deletes and token changes all announce "*": forget every negative token
            # (one of them may exist now; dropped at once, however many junk tokens there are)
            # and then this enterprise's tokens (a walk over the known tokens only).
            self._tokens.invalidate_negatives()
            self._tokens.invalidate_if(lambda _token, owner: owner == number)

    # -- loaders (one query each) ----------------------------------------------------------

    async def _fetch(self, sql: str, *args: str) -> list[Any]:
        self._queries += 1
        async with self._pool.acquire() as conn:
            return list(await conn.fetch(sql, *args))

    async def _load_numbers(self) -> Mapping[str, frozenset[str]]:
        return {r["number"]: frozenset(r["enabled"]) for r in await self._fetch(_ALL_ENABLED)}

    async def _load_number(self, number: str) -> frozenset[str] | None:
        rows = await self._fetch(_ONE_ENABLED, number)
        return frozenset(rows[0]["enabled"]) if rows else None

    async def _load_tokens(self) -> Mapping[str, str]:
        rows = await self._fetch(_ALL_IDENTITIES)
        tokens: dict[str, str] = {}
        # Lowest precedence first, so that name2 overwrites secret overwrites number.
        for column in ("number", "secret", "name2"):
            for row in rows:
                if row[column]:
                    tokens[row[column]] = row["number"]
        return tokens

    async def _load_token(self, token: str) -> str | None:
        self._queries += 1
        async with self._pool.acquire() as conn:
            return await enterprise_for_token(conn, token)

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable: both caches' counters, the listener's state and heartbeat age."""
        return {
            "state": self._state.value,
            "queries": self._queries,
            "preloaded": self._preloaded,
            "matrix": self._numbers.stats(),
            "tokens": self._tokens.stats(),
            "listener": None if self._listener is None else self._listener.stats(),
        }
