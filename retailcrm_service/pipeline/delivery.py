"""Delivery workers: outbox rows -> RetailCRM, paced per API key, behind per-enterprise breakers.

``DeliveryService`` is an async context manager owned by the app lifespan. Its loop claims due rows
(``OutboxStore.claim``: SKIP LOCKED, leased, in order per call), groups them per enterprise and runs
one task per enterprise (so one slow or failing account never holds up the others, and each
account gets at most one request in flight from this instance). Popups go out one by one as
``telephony/call/event``; history goes out as ``telephony/calls/upload`` in batches of up to 50.

Failures: a 503/429 slows the API key down (``Pacer.penalise``) and retries soon; connection
errors, timeouts and 5xx feed the enterprise's breaker (``vochi_crm_client._breaker``) and retry
with persisted backoff; while the breaker is open rows are deferred without using up attempts;
other 4xx answers are final (dead-lettered: retrying cannot fix them). Every attempt is written
to ``integration_logs`` with the call's ``call_unique_id`` (secrets masked by the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

import asyncpg
import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from retailcrm_service.crm.client import (
    RetailCrmApiError,
    RetailCrmClient,
    RetailCrmError,
    RetailCrmRateLimited,
    http_client,
)
from retailcrm_service.crm.mapping import (
    DEFAULT_TIMEZONE,
    KIND_HISTORY,
    KIND_POPUP,
    MappingConfig,
    Skip,
    history_call,
    popup_event,
    upload_batches,
    valid_timezone,
)
from retailcrm_service.crm.pacing import Pacer, PacingConfig
from retailcrm_service.pipeline.outbox import (
    NOTIFY_CHANNEL,
    OutboxConfig,
    OutboxRow,
    OutboxStore,
    Outcome,
)
from vochi_crm_client import ChangeListener, ListenerSettings
from vochi_crm_client._breaker import Breaker
from vochi_crm_client._config import BreakerConfig

logger = logging.getLogger(__name__)

CALL_EVENT = "telephony/call/event"
CALLS_UPLOAD = "telephony/calls/upload"


class ConfigSource(Protocol):
    async def get(self, number: str) -> Any: ...


class LogSink(Protocol):
    def write(
        self,
        enterprise_number: str,
        event_type: str,
        *,
        request_data: Any,
        response_data: Any,
        status: str,
        error_message: str | None = None,
        call_unique_id: str | None = None,
        redact: Any = (),
    ) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    """Worker policy; defaults are production values."""

    claim_batch: int = 200
    max_enterprises: int = 32
    poll_interval: float = 0.5
    sweep_interval: float = 1.0
    instance_ttl: float = 5.0
    rate_limit_retry: float = 1.0
    upload_batch: int = 50
    request_timeout: float = 3.0
    close_timeout: float = 5.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    pacing: PacingConfig = field(default_factory=PacingConfig)

    def __post_init__(self) -> None:
        if self.claim_batch < 1 or self.max_enterprises < 1 or not 1 <= self.upload_batch <= 50:
            raise ValueError("claim_batch, max_enterprises >= 1 and upload_batch in 1..50")
        if min(self.poll_interval, self.sweep_interval, self.request_timeout) <= 0:
            raise ValueError("intervals and timeouts must be positive")
        if self.instance_ttl <= self.sweep_interval:
            raise ValueError("instance_ttl must exceed sweep_interval")


@dataclass(slots=True)
class EnterpriseCounters:
    delivered: int = 0
    popups_delivered: int = 0
    calls_uploaded: int = 0
    failed: int = 0
    expired: int = 0
    superseded: int = 0
    dead: int = 0
    skipped: int = 0
    deferred: int = 0
    rate_limited: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "delivered": self.delivered,
            "popups_delivered": self.popups_delivered,
            "calls_uploaded": self.calls_uploaded,
            "failed": self.failed,
            "expired": self.expired,
            "superseded": self.superseded,
            "dead": self.dead,
            "skipped": self.skipped,
            "deferred": self.deferred,
            "rate_limited": self.rate_limited,
            "latency_p50_ms": _quantile(lat, 0.5),
            "latency_p99_ms": _quantile(lat, 0.99),
            "latency_max_ms": round(lat[-1] * 1000, 1) if lat else 0.0,
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


class _PromMetrics:
    """Labelled Prometheus series (per enterprise) in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "retailcrm_outbox_outcomes",
            "Outcomes of delivery attempts and sweeps, per enterprise and row kind",
            ["enterprise", "kind", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "retailcrm_outbox_delivery_latency_seconds",
            "From acceptance (commit) to delivery to RetailCRM",
            ["enterprise", "kind"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=registry,
        )


def default_owner() -> str:
    """A lease owner name unique to this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


class DeliveryService:
    """The delivery workers of one service instance (see module docstring)."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        configs: ConfigSource,
        logs: LogSink | None = None,
        http: httpx.AsyncClient | None = None,
        config: DeliveryConfig | None = None,
        outbox: OutboxConfig | None = None,
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        registry: CollectorRegistry | None = None,
        pacer: Pacer | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        self.config = config or DeliveryConfig()
        self._prom = _PromMetrics(registry) if registry is not None else None
        self._rng = rng or random.Random()
        self.store = OutboxStore(
            pool=pool, owner=owner or default_owner(), config=outbox, rng=self._rng
        )
        self._configs = configs
        self._logs = logs
        self._http = http
        self._own_http = http is None
        self._clock = clock
        # One budget per API key, shared with smart-redirect lookups when the runtime passes it.
        self.pacer = pacer or Pacer(config=self.config.pacing, clock=clock, sleep=sleep)
        self._breakers: dict[str, Breaker] = {}
        self._counters: dict[str, EnterpriseCounters] = {}
        self._busy: set[str] = set()
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._backlog: dict[str, Any] = {}
        self._settler = _Settler(self.store, self._spawn)
        # With a DSN, a dedicated connection listens for the outbox's commit notifications (any
        # instance's): new rows are claimed when they commit, not at the next poll.
        self._listener = (
            ChangeListener(
                dsn=listen_dsn,
                on_change=lambda _change: self.wake(),
                on_reload=self._woken_after_reconnect,
                settings=ListenerSettings(
                    channel=NOTIFY_CHANNEL, application_name="retailcrm-delivery-listener"
                ),
            )
            if listen_dsn
            else None
        )
        self.loop_errors = 0
        self.instances = 1

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> DeliveryService:
        if self._http is None:
            self._http = http_client(timeout=self.config.request_timeout, max_connections=64)
        if self._listener is not None:
            await self._listener.__aenter__()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._tasks.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._wakeup.set()
        assert self._tasks is not None
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await self._tasks.__aexit__(None, None, None)
        except TimeoutError:
            logger.warning("delivery.close_timeout: in-flight rows stay leased until expiry")
        finally:
            self._tasks = None
            if self._listener is not None:
                await self._listener.__aexit__(None, None, None)
            with contextlib.suppress(Exception):  # best effort: the heartbeat also expires
                await asyncio.wait_for(self.store.leave(), 2.0)
            if self._own_http and self._http is not None:
                await self._http.aclose()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # In the task group (settles come from its enterprise tasks), so closing waits for a
        # settle in flight.
        assert self._tasks is not None
        self._tasks.create_task(work)

    def wake(self) -> None:
        """New rows were committed: claim now instead of at the next poll."""
        self._wakeup.set()

    async def _woken_after_reconnect(self) -> None:
        # Notifications sent while the listener was away are lost: look for due rows now.
        self.wake()

    # -- observability ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        totals = EnterpriseCounters()
        for c in self._counters.values():
            for name in ("delivered", "failed", "expired", "superseded", "dead", "skipped"):
                setattr(totals, name, getattr(totals, name) + getattr(c, name))
            totals.latencies.extend(c.latencies)
        return {
            "owner": self.store.owner,
            "backlog": dict(self._backlog),
            "totals": totals.snapshot(),
            "enterprises": {n: c.snapshot() for n, c in sorted(self._counters.items())},
            "breakers": {n: b.stats()["state"] for n, b in sorted(self._breakers.items())},
            "loop_errors": self.loop_errors,
            "instances": self.instances,
            "pacing_share": round(self.pacer.share, 3),
        }

    async def health(self) -> dict[str, Any]:
        """Backlog and the oldest due event, read from the database now."""
        self._backlog = await self.store.backlog()
        return dict(self._backlog)

    # -- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._tasks is not None
        last_sweep = float("-inf")
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._clock() - last_sweep >= self.config.sweep_interval:
                    last_sweep = self._clock()
                    await self._sweep()
                claimed = await self._claim()
                failures = 0
            except Exception as exc:  # the worker outlives any failure; rows stay in the outbox
                self.loop_errors += 1
                failures += 1
                logger.warning("delivery.loop_error error=%s", type(exc).__name__)
                await self._idle(min(5.0, 0.2 * 2**failures))
                continue
            if not claimed:
                await self._idle(self.config.poll_interval)

    async def _idle(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def _sweep(self) -> None:
        self.instances = await self.store.heartbeat(alive_within=self.config.instance_ttl)
        self.pacer.set_share(1.0 / self.instances)
        swept = await self.store.sweep()
        for outcome in ("expired", "superseded"):
            for number in swept[outcome]:
                counters = self._count(number)
                setattr(counters, outcome, getattr(counters, outcome) + 1)
                if self._prom is not None:
                    self._prom.outcomes.labels(number, KIND_POPUP, outcome).inc()
        self._backlog = await self.store.backlog()

    async def _claim(self) -> bool:
        assert self._tasks is not None
        if len(self._busy) >= self.config.max_enterprises:
            return False
        rows = await self.store.claim(self.config.claim_batch, exclude=sorted(self._busy))
        by_enterprise: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_enterprise.setdefault(row.enterprise_number, []).append(row)
        for number, batch in by_enterprise.items():
            self._busy.add(number)
            self._tasks.create_task(self._deliver_enterprise(number, batch))
        return bool(rows)

    async def _deliver_enterprise(self, number: str, rows: list[OutboxRow]) -> None:
        settler = _TaskSettles(self._settler, lambda outcomes: self._record(number, outcomes))

        async def settle(outcomes: list[Outcome]) -> None:
            # Settled after every request, in the background (see _Settler): a crash re-sends
            # at most the requests made since the last settle that committed.
            settler.add(outcomes)

        try:
            try:
                await self._attempt(number, rows, settle)
            finally:
                await settler.flush()
        except Exception as exc:
            # Whatever failed (database, a bug in one row's mapping), the leases lapse and
            # the rows are claimed again: at-least-once, never lost.
            logger.warning(
                "delivery.attempt_failed enterprise=%s error=%s", number, type(exc).__name__
            )
        finally:
            self._busy.discard(number)
            self._wakeup.set()

    async def _attempt(
        self,
        number: str,
        rows: list[OutboxRow],
        settle: Callable[[list[Outcome]], Awaitable[None]],
    ) -> None:
        config = await self._configs.get(number)
        if config is None or not getattr(config, "is_on", False):
            reason = "unknown enterprise" if config is None else "retailcrm disabled"
            await settle([Outcome(row, "skipped", reason) for row in rows])
            return
        mapping = MappingConfig(
            timezone=_valid_timezone(getattr(config, "timezone", None)),
            account_timezone=valid_timezone(getattr(config, "account_timezone", None)),
            user_extensions=dict(getattr(config, "user_extensions", {}) or {}),
            internal_calls=bool(getattr(config, "internal_calls", False)),
        )
        assert self._http is not None
        client = RetailCrmClient(
            domain=config.domain,
            api_key=config.api_key,
            http=self._http,
            timeout=self.config.request_timeout,
        )
        # Stop well inside the lease: past it another worker may take the same rows.
        deadline = self._clock() + self.store.config.lease_seconds / 2
        sender = _Sender(self, number, client, config.api_key, mapping, deadline)
        popups = [row for row in rows if row.kind == KIND_POPUP]
        history = [row for row in rows if row.kind == KIND_HISTORY]
        for index, row in enumerate(popups):
            if sender.out_of_time():
                await settle(_released(popups[index:] + history))
                return
            await settle([await sender.popup(row)])
        if history:
            bridges = await self.store.bridges(number, [r.call_unique_id for r in history])
            await sender.history(history, bridges, settle)

    def _record(self, number: str, outcomes: Sequence[Outcome]) -> None:
        counters = self._count(number)
        now = datetime.now(UTC)
        for outcome in outcomes:
            if self._prom is not None:
                self._prom.outcomes.labels(number, outcome.row.kind, outcome.result).inc()
            if outcome.result == "delivered":
                latency = max(0.0, (now - outcome.row.created_at).total_seconds())
                counters.delivered += 1
                counters.latencies.append(latency)
                if self._prom is not None:
                    self._prom.latency.labels(number, outcome.row.kind).observe(latency)
            elif outcome.result in ("dead", "skipped"):
                setattr(counters, outcome.result, getattr(counters, outcome.result) + 1)
            elif outcome.result == "deferred":
                counters.deferred += 1

    def _count(self, number: str) -> EnterpriseCounters:
        counters = self._counters.get(number)
        if counters is None:
            counters = self._counters[number] = EnterpriseCounters()
        return counters

    def _breaker(self, number: str) -> Breaker:
        breaker = self._breakers.get(number)
        if breaker is None:
            breaker = self._breakers[number] = Breaker(self.config.breaker, rng=self._rng)
        return breaker


class _Settler:
    """Settles the outcomes of every enterprise task of the instance in the background.

    Settling after each request used to sit between two requests of the account (one database
    round trip, plus the wait for a pooled connection when many accounts are busy), and cost one
    statement per request. Here one settle statement runs at a time and carries whatever every
    task added meanwhile; ``add`` returns a future resolved once that statement committed.
    """

    def __init__(
        self, store: OutboxStore, spawn: Callable[[Coroutine[Any, Any, None]], None]
    ) -> None:
        self._store = store
        self._spawn = spawn
        self._queued: list[tuple[list[Outcome], asyncio.Future[None]]] = []
        self._draining = False

    def add(self, outcomes: list[Outcome]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((outcomes, done))
        if not self._draining:
            self._draining = True
            self._spawn(self._drain())
        return done

    async def _drain(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    await self._store.settle([o for outcomes, _ in batch for o in outcomes])
                except Exception as exc:  # every task of the batch hears it and stops sending
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._draining = False


class _TaskSettles:
    """One enterprise task's settles: ``add`` raises the failure of an earlier one (the task
    stops sending; its rows' leases lapse and they are claimed again, as before), ``flush``
    waits until all of them committed."""

    def __init__(self, settler: _Settler, record: Callable[[list[Outcome]], None]) -> None:
        self._settler = settler
        self._record = record
        self._waiting: list[tuple[list[Outcome], asyncio.Future[None]]] = []

    def add(self, outcomes: list[Outcome]) -> None:
        self._collect()
        self._waiting.append((outcomes, self._settler.add(outcomes)))

    async def flush(self) -> None:
        for _, done in self._waiting:
            await asyncio.shield(done)
        self._collect()

    def _collect(self) -> None:
        still: list[tuple[list[Outcome], asyncio.Future[None]]] = []
        for outcomes, done in self._waiting:
            if not done.done():
                still.append((outcomes, done))
                continue
            exc = done.exception()
            if exc is not None:
                raise exc
            self._record(outcomes)
        self._waiting = still


def _released(rows: Sequence[OutboxRow]) -> list[Outcome]:
    """Hand rows back untried (no attempt spent), due now."""
    return [Outcome(row, "deferred", "lease budget spent", retry_after=0.0) for row in rows]


class _Sender:
    """Sends one enterprise's claimed rows through its breaker and its key's pacer."""

    def __init__(
        self,
        service: DeliveryService,
        number: str,
        client: RetailCrmClient,
        api_key: Any,
        mapping: MappingConfig,
        deadline: float = float("inf"),
    ) -> None:
        self._service = service
        self._deadline = deadline
        self._number = number
        self._client = client
        self._key = api_key.get_secret_value()
        self._mapping = mapping

    def out_of_time(self) -> bool:
        return self._service._clock() >= self._deadline

    async def popup(self, row: OutboxRow) -> Outcome:
        if row.expires_at is not None and row.expires_at < datetime.now(UTC):
            self._service._count(self._number).expired += 1
            return Outcome(row, "expired", "popup expired")
        try:
            event = popup_event(row.event_type, row.payload, self._mapping)
        except Exception as exc:
            return _unmappable(row, exc)
        if isinstance(event, Skip):
            return Outcome(row, "skipped", event.reason)
        error = await self._call(CALL_EVENT, [row], event)
        if error is None:
            self._service._count(self._number).popups_delivered += 1
            return Outcome(row, "delivered")
        return error[0]

    async def history(
        self,
        rows: list[OutboxRow],
        bridges: dict[str, list[dict[str, Any]]],
        settle: Callable[[list[Outcome]], Awaitable[None]],
    ) -> None:
        skipped: list[Outcome] = []
        mapped: list[tuple[OutboxRow, dict[str, Any]]] = []
        for row in rows:
            try:
                call = history_call(row.payload, self._mapping, bridges.get(row.call_unique_id, []))
            except Exception as exc:
                skipped.append(_unmappable(row, exc))
                continue
            if isinstance(call, Skip):
                skipped.append(Outcome(row, "skipped", call.reason))
            else:
                mapped.append((row, call))
        if skipped:
            await settle(skipped)
        size = self._service.config.upload_batch
        batches = upload_batches([{"row": r, "call": c} for r, c in mapped], size)
        for index, batch in enumerate(batches):
            if self.out_of_time():
                await settle(_released([b["row"] for rest in batches[index:] for b in rest]))
                return
            await settle(await self._upload([b["row"] for b in batch], [b["call"] for b in batch]))

    async def _upload(self, rows: list[OutboxRow], calls: list[dict[str, Any]]) -> list[Outcome]:
        error = await self._call(CALLS_UPLOAD, rows, calls)
        if error is None:
            self._service._count(self._number).calls_uploaded += len(rows)
            return [Outcome(row, "delivered") for row in rows]
        if len(rows) > 1 and error[0].result == "dead":
            # One bad call must not sink its batch: find it by sending them one by one.
            outcomes: list[Outcome] = []
            for row, call in zip(rows, calls, strict=True):
                outcomes.extend(await self._upload([row], [call]))
            return outcomes
        return error

    async def _call(self, method: str, rows: list[OutboxRow], body: Any) -> list[Outcome] | None:
        """Make one request; None on success, else the outcome for every row."""
        service = self._service
        breaker = service._breaker(self._number)
        permit = breaker.acquire(service._clock())
        if permit is None:
            wait = max(0.05, breaker.retry_in(service._clock()))
            return [Outcome(row, "deferred", "breaker open", retry_after=wait) for row in rows]
        ok = False
        cancelled = False
        try:
            await service.pacer.acquire(self._key, method)
            if method == CALL_EVENT:
                response: Any = await self._client.call_event(body)
            else:
                result = await self._client.calls_upload(body)
                response = {
                    "processedCallsCount": result.processed_calls_count,
                    "duplicateCalls": list(result.duplicate_calls),
                }
            ok = True
            self._log(method, rows, body, response, None)
            return None
        except RetailCrmRateLimited as exc:
            ok = True  # RetailCRM is up; we were too fast
            service.pacer.penalise(self._key)
            service._count(self._number).rate_limited += 1
            self._log(method, rows, body, None, exc)
            wait = exc.retry_after or service.config.rate_limit_retry
            return [Outcome(row, "retry", str(exc), retry_after=wait) for row in rows]
        except RetailCrmApiError as exc:
            ok = True  # a definite answer: retrying the same request cannot succeed
            self._log(method, rows, body, {"errorMsg": exc.error_msg, "errors": exc.errors}, exc)
            service._count(self._number).failed += 1
            return [Outcome(row, "dead", f"{exc.status}: {exc.error_msg}") for row in rows]
        except RetailCrmError as exc:
            self._log(method, rows, body, None, exc)
            service._count(self._number).failed += 1
            return [Outcome(row, "retry", str(exc)) for row in rows]
        except asyncio.CancelledError:
            cancelled = True
            breaker.release(permit)
            raise
        finally:
            if not cancelled:
                breaker.record(permit, ok, service._clock())

    def _log(
        self,
        method: str,
        rows: list[OutboxRow],
        body: Any,
        response: Any,
        error: RetailCrmError | None,
    ) -> None:
        logs = self._service._logs
        if logs is None:
            return
        event_type = "call_event" if method == CALL_EVENT else "calls_upload"
        calls = body if isinstance(body, list) else [body]
        for row, request in zip(rows, calls, strict=False):
            logs.write(
                self._number,
                event_type,
                request_data={"method": method, "body": request, "attempt": row.attempts},
                response_data=response,
                status="success" if error is None else "error",
                error_message=None if error is None else str(error),
                call_unique_id=row.call_unique_id,
                redact=(self._key,),
            )


def _unmappable(row: OutboxRow, exc: Exception) -> Outcome:
    """A row the mapping cannot turn into a RetailCRM request: it fails the same way on every
    attempt, so it is dead-lettered (kept, replayable) instead of poisoning its enterprise's
    queue with endless re-claims."""
    logger.error(
        "delivery.unmappable enterprise=%s id=%s error=%s",
        row.enterprise_number,
        row.id,
        type(exc).__name__,
    )
    return Outcome(row, "dead", f"unmappable: {type(exc).__name__}: {str(exc)[:200]}")


def _valid_timezone(name: Any) -> str:
    return valid_timezone(name) or DEFAULT_TIMEZONE
