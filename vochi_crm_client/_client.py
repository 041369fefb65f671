"""``CrmClient``: fire-and-forget delivery of call events to every CRM an enterprise has on.

``emit`` is the call path's only contact with the CRMs. It is synchronous and O(1): one lookup in
the matrix's in-memory snapshot, then one append to the buffer of each enabled target. It never
awaits, never blocks and never raises because of the network, a CRM or the database. An event
whose enterprise the matrix has not loaded yet waits in a small pending buffer while one
background load per enterprise runs (the caller does not wait for it).

Lifecycle (``async with``): opening starts the matrix (unless one is passed in), one keep-alive
HTTP client and ``max_in_flight`` workers per target, all owned by the client's
``BackgroundTasks``.
Closing stops intake, flushes for at most ``drain_timeout`` (shielded from the caller's
cancellation, so a shutting-down service still flushes), cancels what is left and logs, per
target, how many events it could not deliver; ``stats()`` keeps those numbers.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, Protocol, Self

import anyio
import httpx

from vochi_crm_client._backoff import BackoffPolicy, delay
from vochi_crm_client._breaker import Breaker, BreakerState
from vochi_crm_client._cache import NOT_LOADED, CacheSettings, NotLoaded
from vochi_crm_client._config import BreakerConfig, DispatchConfig
from vochi_crm_client._dispatch import TargetSender
from vochi_crm_client._event import CallEvent
from vochi_crm_client._exceptions import LoadError, StateError
from vochi_crm_client._listener import ListenerSettings
from vochi_crm_client._matrix import EnablementMatrix
from vochi_crm_client._tasks import BackgroundTasks, log_unexpected

__all__ = ["ClientState", "CrmClient", "Matrix"]

logger = logging.getLogger(__name__)

_RESOLVE_BACKOFF = BackoffPolicy(base=0.5, cap=10.0)


class Matrix(Protocol):
    """What the client needs from an enablement matrix (``EnablementMatrix`` is one)."""

    def lookup(self, number: str) -> frozenset[str] | NotLoaded | None: ...

    def lookup_token(self, token: str) -> str | NotLoaded | None: ...

    async def integrations_for(self, number: str) -> frozenset[str]: ...

    async def resolve_token(self, token: str) -> str | None: ...

    def stats(self) -> dict[str, Any]: ...


class ClientState(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class CrmClient:
    """Routes call events to the CRM targets each enterprise has enabled; see the module doc.

    ``targets`` maps an integration name of ``integrations_config`` (``"retailcrm"``) to the URL
    of its service's ``/api/events``. Either ``dsn`` (the client opens and owns an
    ``EnablementMatrix`` built with ``cache``, ``listener``, ``listen`` and ``preload``) or
    ``matrix`` (owned by the caller, already open) must be given. ``dispatch`` holds the
    batching, retry, buffering and shutdown tunables (``DispatchConfig``); ``breaker`` tunes every
    target's circuit breaker (``BreakerConfig``); ``cache`` and ``listener`` tune the matrix.

    Like any asyncio object it belongs to the event loop (and thread) that opened it: call
    ``emit`` from there (a call service's request handlers do).
    """

    def __init__(
        self,
        *,
        targets: Mapping[str, str],
        dsn: str | None = None,
        matrix: Matrix | None = None,
        dispatch: DispatchConfig | None = None,
        breaker: BreakerConfig | None = None,
        cache: CacheSettings | None = None,
        listener: ListenerSettings | None = None,
        listen: bool = True,
        preload: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if (dsn is None) == (matrix is None):
            raise ValueError("pass exactly one of dsn= and matrix=")
        if not targets:
            raise ValueError("targets must name at least one CRM target")
        for name, url in targets.items():
            if not name or not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"target {name!r} needs an http(s) URL")
        self.config = dispatch or DispatchConfig()
        self.breaker_config = breaker or BreakerConfig()
        self._targets = dict(targets)
        self._dsn = dsn
        self._matrix_options: dict[str, Any] = {
            "cache": cache,
            "listener": listener,
            "listen": listen,
            "preload": preload,
        }
        self._given_matrix = matrix
        self._matrix: Matrix | None = matrix
        self._transport = transport
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._state = ClientState.UNOPENED
        self._senders: dict[str, TargetSender] = {}
        self._stack: AsyncExitStack | None = None
        self._tasks = BackgroundTasks("crm-client", logger=logger)
        self._pending: dict[str, list[tuple[CallEvent, float]]] = {}
        self._pending_count = 0
        self._resolved = anyio.Event()
        self._counts = dict.fromkeys(
            (
                "emitted",
                "routed",
                "unknown_enterprise",
                "no_target",
                "pending_overflow",
                "not_open",
                "resolve_errors",
            ),
            0,
        )
        self.undelivered: dict[str, int] = {}
        self._lookup: Callable[[str], frozenset[str] | NotLoaded | None] = _never_loaded

    def __repr__(self) -> str:
        return f"<CrmClient {self._state.value} targets={sorted(self._targets)}>"

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def matrix(self) -> Matrix:
        if self._matrix is None:
            raise StateError("the CrmClient is not open")
        return self._matrix

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is not ClientState.UNOPENED:
            raise StateError("a CrmClient can be opened only once")
        stack = AsyncExitStack()
        try:
            if self._given_matrix is None:
                assert self._dsn is not None
                owned = EnablementMatrix(
                    dsn=self._dsn,
                    clock=self._clock,
                    sleep=self._sleep,
                    rng=self._rng,
                    **self._matrix_options,
                )
                self._matrix = await stack.enter_async_context(owned)
            assert self._matrix is not None
            self._lookup = self._matrix.lookup
            if self._transport is not None:  # the caller's, shared: closed once, at the end
                stack.push_async_callback(self._transport.aclose)
            for name, url in self._targets.items():
                transport = self._transport
                if transport is None:
                    transport = self._pool()
                    stack.push_async_callback(transport.aclose)
                self._senders[name] = TargetSender(
                    name=name,
                    url=url,
                    transport=transport,
                    config=self.config,
                    breaker=Breaker(self.breaker_config, rng=self._rng),
                    clock=self._clock,
                    sleep=self._sleep,
                    rng=self._rng,
                )
        except BaseException:
            await stack.aclose()
            raise
        self._tasks.open()
        for sender in self._senders.values():
            sender.start(self._tasks)
        self._stack = stack
        self._state = ClientState.OPEN
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._state is not ClientState.OPEN:
            return
        self._state = ClientState.CLOSING
        assert self._stack is not None
        try:
            # Shielded: a caller being cancelled still gets its events flushed. The workers and
            # resolvers are the client's own tasks, which the caller's cancellation never reaches.
            with anyio.CancelScope(shield=True):
                await self._drain_within_deadline()
            self._tasks.cancel()
            # Counted before the workers unwind: nothing moves once they are cancelled.
            self._report_undelivered()
            await self._tasks.close()
        finally:
            self._state = ClientState.CLOSED
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()

    def _pool(self) -> httpx.AsyncHTTPTransport:
        """A target's keep-alive pool of ``max_in_flight`` connections (the senders use a
        transport directly: never an environment proxy for internal calls)."""
        n = self.config.max_in_flight
        return httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)
        )

    async def _drain_within_deadline(self) -> None:
        async with anyio.create_task_group() as tg:

            async def deadline() -> None:
                await self._sleep(self.config.drain_timeout)
                tg.cancel_scope.cancel()

            async def drain() -> None:
                await self._drain()
                tg.cancel_scope.cancel()

            tg.start_soon(deadline)
            tg.start_soon(drain)

    async def _drain(self) -> None:
        if self._pending:
            await self._resolved.wait()
        for sender in self._senders.values():
            sender.close()
        for sender in self._senders.values():
            await sender.wait_idle()

    def _report_undelivered(self) -> None:
        pending = self._pending_count
        self._pending.clear()
        self._pending_count = 0
        for name, sender in self._senders.items():
            lost = sender.abandon()
            if pending:
                sender.counters.dropped["shutdown"] += pending
                lost += pending
            self.undelivered[name] = lost
            if lost:
                logger.warning("crm.undelivered_at_close target=%s events=%d", name, lost)

    # -- the hot path ------------------------------------------------------------------------

    def emit(self, event: CallEvent) -> None:
        """Queue ``event`` for every CRM its enterprise has on. Sync, O(1), never blocks.

        It never raises because of the network, a CRM or the database; only a non-``CallEvent``
        argument raises (``TypeError``). Before the client opens and once it starts closing,
        events are counted (``not_open``) and dropped.
        """
        if type(event) is not CallEvent:
            raise TypeError(f"emit() takes a CallEvent, not {type(event).__name__}")
        counts = self._counts
        counts["emitted"] += 1
        if self._state is not ClientState.OPEN:
            counts["not_open"] += 1
            return
        targets = self._lookup(event.enterprise_number)
        if targets is None:
            counts["unknown_enterprise"] += 1
        elif targets is NOT_LOADED:
            self._park(event)
        else:
            routed = False
            senders = self._senders
            for name in targets:
                sender = senders.get(name)
                if sender is not None:
                    sender.put(event)
                    routed = True
            counts["routed" if routed else "no_target"] += 1

    def _route(self, event: CallEvent, targets: frozenset[str], enqueued_at: float | None) -> None:
        routed = False
        for name in targets:
            sender = self._senders.get(name)
            if sender is not None:
                sender.put(event, enqueued_at)
                routed = True
        self._counts["routed" if routed else "no_target"] += 1

    def _park(self, event: CallEvent) -> None:
        if self._pending_count >= self.config.pending_max:
            self._counts["pending_overflow"] += 1
            return
        number = event.enterprise_number
        waiting = self._pending.get(number)
        if waiting is None:
            waiting = self._pending[number] = []
            if self._resolved.is_set():
                self._resolved = anyio.Event()
            self._tasks.start(self._resolve, number, name=f"vochi-crm-resolve-{number}")
        waiting.append((event, self._clock()))
        self._pending_count += 1

    async def _resolve(self, number: str) -> None:
        """Load ``number`` into the matrix, then route the events that waited for it."""
        assert self._matrix is not None
        attempt = 0
        while True:
            try:
                targets = await self._matrix.integrations_for(number)
                break
            except Exception as exc:  # LoadError, or a bug: keep the call path unaffected
                attempt += 1
                self._counts["resolve_errors"] += 1
                if isinstance(exc, LoadError):
                    logger.warning(
                        "crm.resolve_failed enterprise=%s attempt=%d error=%s",
                        number,
                        attempt,
                        type(exc).__name__,
                    )
                else:
                    log_unexpected(
                        logger, "crm.resolve_failed", exc, enterprise=number, attempt=attempt
                    )
                await self._sleep(delay(attempt, _RESOLVE_BACKOFF, self._rng))
        waiting = self._pending.pop(number, [])
        self._pending_count -= len(waiting)
        if not self._pending:
            self._resolved.set()
        if not targets:
            known = self._lookup(number) is not None  # None: no such enterprise
            self._counts["no_target" if known else "unknown_enterprise"] += len(waiting)
            return
        for event, enqueued_at in waiting:
            self._route(event, targets, enqueued_at)

    # -- matrix passthrough ------------------------------------------------------------------

    async def integrations_for(self, number: str) -> frozenset[str]:
        """The integrations on for ``number`` (empty if unknown); loads on a miss."""
        return await self.matrix.integrations_for(number)

    async def resolve_token(self, token: str) -> str | None:
        """The enterprise number a host ``Token`` names (``name2``/``secret``/``number``)."""
        return await self.matrix.resolve_token(token)

    # -- observation -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable counters: the client's, each target's and the matrix's."""
        return {
            "state": self._state.value,
            **self._counts,
            "pending": self._pending_count,
            "targets": {name: s.stats() for name, s in self._senders.items()},
            "undelivered_at_close": dict(self.undelivered),
            "matrix": self._matrix.stats() if self._matrix is not None else None,
        }

    def health(self) -> dict[str, Any]:
        """A small JSON summary: ``ok`` while the client is open and every breaker is closed."""
        breakers = {name: s.breaker.state for name, s in self._senders.items()}
        listener = None
        if self._matrix is not None:
            listener = (self._matrix.stats().get("listener") or {}) or None
        ok = self._state is ClientState.OPEN and all(
            b is BreakerState.CLOSED for b in breakers.values()
        )
        return {
            "status": "ok" if ok else "degraded",
            "client": self._state.value,
            "targets": {
                name: {"breaker": b.value, "queued": self._senders[name].buffer.queued}
                for name, b in breakers.items()
            },
            "pending": self._pending_count,
            "listener": None
            if listener is None
            else {k: listener.get(k) for k in ("state", "heartbeat_age", "last_error")},
        }


def _never_loaded(number: str) -> NotLoaded:
    return NOT_LOADED
