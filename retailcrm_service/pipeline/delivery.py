"""Delivery workers: outbox rows -> RetailCRM, paced per API key, behind per-enterprise breakers.

``DeliveryService`` is an async context manager owned by the app lifespan. Its loop claims due rows
(``OutboxStore.claim``: SKIP LOCKED, leased, in order per call), groups them per enterprise and runs
one task per enterprise (so one slow or failing account never holds up the others). Popups go
out as ``telephony/call/event``, up to ``popup_concurrency`` at once per enterprise (each of
another call: the claim takes one row per call), each settled as soon as it is answered; then
history goes out as ``telephony/calls/upload`` in batches of up to 50.
No request starts after half the lease (the wait for the key's pacer slot included; what is left
is handed back unsent), and the leases are extended while a request is in flight, so no other
instance takes rows this one may still send.

Failures: a 503/429 slows the API key down (``Pacer.penalise``) and retries soon; connection
errors, timeouts and 5xx feed the enterprise's breaker (the library's ``Breaker``) and retry
with persisted backoff; while the breaker is open rows are deferred without using up attempts;
other 4xx answers are final (dead-lettered: retrying cannot fix them). An enterprise whose API key
does not decrypt on this instance has its rows deferred (never skipped) until it does. Every
attempt is written to ``integration_logs`` with the call's ``call_unique_id`` (secrets masked by
the writer).
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram

from retailcrm_service.crm.client import (
    CrmHttpClient,
    RetailCrmApiError,
    RetailCrmClient,
    RetailCrmError,
    RetailCrmRateLimited,
    http_client,
)
from retailcrm_service.crm.mapping import (
    CALL_OUTGOING,
    DEFAULT_TIMEZONE,
    KIND_HISTORY,
    KIND_POPUP,
    MappingConfig,
    Skip,
    call_type,
    history_call,
    popup_event,
    upload_batches,
    valid_timezone,
)
from retailcrm_service.crm.pacing import Pacer, PacingConfig
from retailcrm_service.pipeline.outbox import (
    NOTIFY_CHANNEL,
    GroupSettler,
    OutboxConfig,
    OutboxRow,
    OutboxStore,
    Outcome,
)
from retailcrm_service.storage.database import DATABASE_ERRORS
from vochi_crm_client import (
    BackgroundTasks,
    Breaker,
    BreakerConfig,
    ChangeListener,
    ListenerSettings,
    log_unexpected,
)

logger = logging.getLogger(__name__)

CALL_EVENT = "telephony/call/event"
CALLS_UPLOAD = "telephony/calls/upload"
CLAIM_GAP = 0.01  # DeliveryConfig.claim_gap's default
_KEY_UNREADABLE = "API key cannot be decrypted (RETAILCRM_SECRET_KEY)"


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


# Past a history tick, how long the idle loop waits before it claims (the database's clock may
# run a little behind this host's).
_TICK_MARGIN = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    """Worker policy; defaults are production values."""

    claim_batch: int = 200
    max_enterprises: int = 32
    # Popups of one enterprise in flight at once. One at a time, an account's popups took a
    # round trip and a settle each: past ~8 calls/s per account they queued behind each other
    # (popup p50 270 ms at 300 calls/s over 40 accounts in benchmarks/peak_calls.py) while the
    # key's pacer still had room. The pacer keeps the key under RetailCRM's limits either way.
    popup_concurrency: int = 4
    poll_interval: float = 0.5
    # At most one claim per this many seconds: wake-ups that come sooner (each commit and each
    # enterprise finishing wakes the loop) wait the rest of it, so one claim takes what they
    # brought together. It bounds the extra popup latency; under steady load it halved the
    # claims (benchmarks/peak_calls.py).
    claim_gap: float = CLAIM_GAP
    # Settles wait this long for others to share their UPDATE (see GroupSettler).
    settle_linger: float = 0.005
    sweep_interval: float = 1.0
    instance_ttl: float = 5.0
    # An instance silent this long is taken for dead and its leases are released (see
    # OutboxStore.heartbeat); otherwise a killed instance's rows waited for their whole lease.
    dead_instance_after: float = 15.0
    statistics_interval: float = 10.0  # how often the outbox's planner statistics are checked
    rate_limit_retry: float = 1.0
    key_unreadable_retry: float = 10.0
    upload_batch: int = 50
    request_timeout: float = 3.0
    close_timeout: float = 5.0
    # Open at most 15 s: an account probes that often during an outage (a request per 15 s is
    # nothing), and is back within 15 s of RetailCRM's return, its failed rows with it.
    breaker: BreakerConfig = field(default_factory=lambda: BreakerConfig(open_max=15.0))
    pacing: PacingConfig = field(default_factory=PacingConfig)

    def __post_init__(self) -> None:
        if min(self.claim_batch, self.max_enterprises, self.popup_concurrency) < 1:
            raise ValueError("claim_batch, max_enterprises and popup_concurrency must be >= 1")
        if not 1 <= self.upload_batch <= 50:
            raise ValueError("upload_batch must be in 1..50")
        if min(self.poll_interval, self.sweep_interval, self.request_timeout) <= 0:
            raise ValueError("intervals and timeouts must be positive")
        if not 0 <= self.claim_gap < self.poll_interval:
            raise ValueError("claim_gap must be >= 0 and below poll_interval")
        if not 0 <= self.settle_linger <= 1:
            raise ValueError("settle_linger must be within 0..1 seconds")
        if self.instance_ttl <= self.sweep_interval:
            raise ValueError("instance_ttl must exceed sweep_interval")
        if self.dead_instance_after <= self.instance_ttl:
            raise ValueError("dead_instance_after must exceed instance_ttl")


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
    """Prometheus series in the app's registry, by row kind and outcome only: enterprise numbers
    would make the series count grow with the customer base (per-enterprise counts are in
    ``stats()``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "retailcrm_service_delivery_outcomes",
            "Outcomes of delivery attempts and sweeps, by row kind",
            ["kind", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "retailcrm_service_delivery_latency_seconds",
            "From acceptance (commit) to delivery to RetailCRM, by row kind",
            ["kind"],
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
        http: CrmHttpClient | None = None,
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
        self.settler = GroupSettler(self.store, linger=self.config.settle_linger)
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
        self._tasks = BackgroundTasks("delivery", logger=logger)
        self._backlog: dict[str, Any] = {}
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
        self.claims = 0  # claim statements run
        self.expedited = 0  # rows made due at once when RetailCRM answered again
        self._failing: set[str] = set()  # enterprises whose last request got no answer
        self.instances = 1
        self.analyzed = 0
        self._statistics_checked = float("-inf")
        self._may_analyze = True

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> DeliveryService:
        if self._http is None:
            self._http = http_client(timeout=self.config.request_timeout, max_connections=64)
        if self._listener is not None:
            await self._listener.__aenter__()
        self._tasks.open()
        self._tasks.start(self._run, name="delivery-loop")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._wakeup.set()
        try:
            if not await self._tasks.close(grace=self.config.close_timeout):
                logger.warning("delivery.close_timeout: in-flight rows stay leased until expiry")
        finally:
            if self._listener is not None:
                await self._listener.__aexit__(None, None, None)
            with contextlib.suppress(Exception):  # best effort: the heartbeat also expires
                await asyncio.wait_for(self.store.leave(), 2.0)
            if self._own_http and self._http is not None:
                await self._http.aclose()

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
            for name in (
                "delivered",
                "failed",
                "expired",
                "superseded",
                "dead",
                "skipped",
                "deferred",
            ):
                setattr(totals, name, getattr(totals, name) + getattr(c, name))
            totals.latencies.extend(c.latencies)
        return {
            "owner": self.store.owner,
            "backlog": dict(self._backlog),
            "totals": totals.snapshot(),
            "enterprises": {n: c.snapshot() for n, c in sorted(self._counters.items())},
            "breakers": {n: b.stats()["state"] for n, b in sorted(self._breakers.items())},
            "loop_errors": self.loop_errors,
            "analyzed": self.analyzed,
            "claim_statements": self.claims,
            "expedited": self.expedited,
            "settle_statements": self.settler.statements,
            "leases_released": self.store.leases_released,
            "instances": self.instances,
            "pacing_share": round(self.pacer.share, 3),
        }

    async def health(self) -> dict[str, Any]:
        """Backlog and the oldest due event, read from the database now."""
        self._backlog = await self.store.backlog()
        return dict(self._backlog)

    # -- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_sweep = last_claim = float("-inf")
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._clock() - last_sweep >= self.config.sweep_interval:
                    last_sweep = self._clock()
                    await self._sweep()
                gap = last_claim + self.config.claim_gap - self._clock()
                if gap > 0:
                    await asyncio.sleep(min(gap, self.config.claim_gap))
                last_claim = self._clock()
                more = await self._claim()
                failures = 0
            except Exception as exc:  # the worker outlives any failure; rows stay in the outbox
                self.loop_errors += 1
                failures += 1
                if isinstance(exc, DATABASE_ERRORS):
                    logger.warning("delivery.loop_error error=%s", type(exc).__name__)
                else:
                    log_unexpected(logger, "delivery.loop_error", exc)
                await self._idle(min(5.0, 0.2 * 2**failures))
                continue
            if not more:
                await self._idle(self._poll_wait())

    def _poll_wait(self) -> float:
        """The poll interval, cut short just after the tick our settles made history rows due
        at (``OutboxConfig.history_gather``): at a quiet time no commit wakes the loop for them."""
        until_tick = self.store.history_tick - time.time()
        if until_tick < 0:
            return self.config.poll_interval
        return min(self.config.poll_interval, until_tick + _TICK_MARGIN)

    async def _idle(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def _sweep(self) -> None:
        self.instances = await self.store.heartbeat(
            alive_within=self.config.instance_ttl, dead_after=self.config.dead_instance_after
        )
        self.pacer.set_share(1.0 / self.instances)
        swept = await self.store.sweep()
        for outcome in ("expired", "superseded"):
            for number in swept[outcome]:
                counters = self._count(number)
                setattr(counters, outcome, getattr(counters, outcome) + 1)
                if self._prom is not None:
                    self._prom.outcomes.labels(KIND_POPUP, outcome).inc()
        self._backlog = await self.store.backlog()
        await self._keep_statistics()

    async def _keep_statistics(self) -> None:
        now = self._clock()
        due = now - self._statistics_checked >= self.config.statistics_interval
        if not (self._may_analyze and due):
            return
        self._statistics_checked = now
        try:
            self.analyzed += await self.store.keep_statistics()
        except asyncpg.InsufficientPrivilegeError:
            # Not the table's owner: autovacuum alone keeps the statistics (see 008).
            self._may_analyze = False
            logger.warning("delivery.analyze_not_permitted table=retailcrm_outbox")

    async def _claim(self) -> bool:
        """Start a task per enterprise with due rows; True when more rows may be due now.

        A claim that came back short took everything due but the busy enterprises' rows, and
        those enterprises wake the loop when they finish, as new events do: claiming again at
        once would be an empty round trip per wake-up (half the claims under steady load).
        """
        if len(self._busy) >= self.config.max_enterprises:
            return False
        # Taken before the claim: the leases end no earlier than lease_seconds after this.
        claimed_at = self._clock()
        self.claims += 1
        rows = await self.store.claim(self.config.claim_batch, exclude=sorted(self._busy))
        by_enterprise: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_enterprise.setdefault(row.enterprise_number, []).append(row)
        for number, batch in by_enterprise.items():
            self._busy.add(number)
            self._tasks.start(
                self._deliver_enterprise, number, batch, claimed_at, name="delivery-enterprise"
            )
        return len(rows) >= self.config.claim_batch

    async def _deliver_enterprise(
        self, number: str, rows: list[OutboxRow], claimed_at: float
    ) -> None:
        async def settle(outcomes: list[Outcome]) -> None:
            # Settled after every request, so a crash re-sends at most the one in flight.
            await self.settler.settle(outcomes)
            self._record(number, outcomes)

        try:
            await self._attempt(number, rows, settle, claimed_at)
        except Exception as exc:
            # Whatever failed (database, a bug in one row's mapping), the leases lapse and
            # the rows are claimed again: at-least-once, never lost.
            if isinstance(exc, DATABASE_ERRORS):
                logger.warning(
                    "delivery.attempt_failed enterprise=%s error=%s", number, type(exc).__name__
                )
            else:
                log_unexpected(logger, "delivery.attempt_failed", exc, enterprise=number)
        finally:
            self._busy.discard(number)
            self._wakeup.set()

    async def _attempt(
        self,
        number: str,
        rows: list[OutboxRow],
        settle: Callable[[list[Outcome]], Awaitable[None]],
        claimed_at: float | None = None,
    ) -> None:
        if claimed_at is None:
            claimed_at = self._clock()
        config = await self._configs.get(number)
        if config is not None and getattr(config, "key_unreadable", False):
            # Switched on, but the key does not decrypt here: the rows wait (no attempt spent)
            # until the key can be read or the admin changes the config; /health says why.
            wait = self.config.key_unreadable_retry
            await settle([Outcome(row, "deferred", _KEY_UNREADABLE, wait) for row in rows])
            return
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
        # Stop well inside the lease: past it another worker may take the same rows. No request
        # starts after half the lease (waiting for the key's turn included); while requests are
        # in flight the leases are extended, and should that fail, no request starts within the
        # last quarter of the lease either.
        lease = self.store.config.lease_seconds
        sender = _Sender(
            self,
            number,
            client,
            config.api_key,
            mapping,
            deadline=claimed_at + lease / 2,
            lease_end=claimed_at + lease,
            margin=lease / 4,
            events=dict(getattr(config, "events", None) or {}),
        )
        keeper = asyncio.get_running_loop().create_task(self._keep_leases(rows, sender))
        try:
            await self._send(number, rows, sender, settle)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_leases(self, rows: Sequence[OutboxRow], sender: _Sender) -> None:
        """Extend the leases of the rows not settled yet, every quarter of the lease."""
        lease = self.store.config.lease_seconds
        ids = [row.id for row in rows]
        while True:
            await asyncio.sleep(lease / 4)
            started = self._clock()
            try:
                async with asyncio.timeout(lease / 4):
                    held = await self.store.extend(ids)
            except Exception as exc:  # the old lease end stands; the sender stops before it
                logger.warning("delivery.lease_extend_failed error=%s", type(exc).__name__)
                continue
            if not held:
                return
            sender.lease_end = started + lease

    async def _send(
        self,
        number: str,
        rows: list[OutboxRow],
        sender: _Sender,
        settle: Callable[[list[Outcome]], Awaitable[None]],
    ) -> None:
        popups = [row for row in rows if row.kind == KIND_POPUP]
        history = [row for row in rows if row.kind == KIND_HISTORY]
        unsent = await self._send_popups(popups, sender, settle)
        if unsent:
            await settle(_released(unsent + history))
            return
        if history:
            await sender.history(history, settle)

    async def _send_popups(
        self,
        popups: list[OutboxRow],
        sender: _Sender,
        settle: Callable[[list[Outcome]], Awaitable[None]],
    ) -> list[OutboxRow]:
        """Send ``popups`` with up to ``popup_concurrency`` requests in flight, each settled as
        it is answered (a crash re-sends at most those in flight); returns the rows left unsent
        because the lease budget ran out, in their order."""
        waiting = deque(popups)
        unsent: list[OutboxRow] = []

        async def sending() -> None:
            while waiting:
                if sender.out_of_time():
                    unsent.extend(waiting)
                    waiting.clear()
                    return
                row = waiting.popleft()
                await settle([await sender.popup(row)])

        width = min(self.config.popup_concurrency, len(popups))
        if width <= 1:
            await sending()
            return unsent
        senders = [asyncio.ensure_future(sending()) for _ in range(width)]
        try:
            await asyncio.gather(*senders)
        except BaseException:
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            raise
        return unsent

    def _record(self, number: str, outcomes: Sequence[Outcome]) -> None:
        counters = self._count(number)
        now = datetime.now(UTC)
        for outcome in outcomes:
            if self._prom is not None:
                self._prom.outcomes.labels(outcome.row.kind, outcome.result).inc()
            if outcome.result == "delivered":
                latency = max(0.0, (now - outcome.row.created_at).total_seconds())
                counters.delivered += 1
                counters.latencies.append(latency)
                if self._prom is not None:
                    self._prom.latency.labels(outcome.row.kind).observe(latency)
            elif outcome.result in ("dead", "skipped"):
                setattr(counters, outcome.result, getattr(counters, outcome.result) + 1)
            elif outcome.result == "deferred":
                counters.deferred += 1

    def _count(self, number: str) -> EnterpriseCounters:
        counters = self._counters.get(number)
        if counters is None:
            counters = self._counters[number] = EnterpriseCounters()
        return counters

    def _answered(self, number: str, ok: bool) -> None:
        """After each request: the first answer after failures means RetailCRM is back (a probe
        of the open breaker, or the next request before it opened), so the rows that failed
        meanwhile need not wait out their backoff (minutes, after a long outage)."""
        if not ok:
            self._failing.add(number)
        elif number in self._failing:
            self._failing.discard(number)
            self._tasks.start(self._expedite, number, name="delivery-expedite")

    async def _expedite(self, number: str) -> None:
        try:
            moved = await self.store.expedite(number)
        except Exception as exc:  # they still go out when their backoff ends
            logger.warning(
                "delivery.expedite_failed enterprise=%s error=%s", number, type(exc).__name__
            )
            return
        self.expedited += moved
        logger.info("delivery.recovered enterprise=%s rows_due_now=%d", number, moved)
        if moved:
            self.wake()

    def _breaker(self, number: str) -> Breaker:
        breaker = self._breakers.get(number)
        if breaker is None:
            breaker = self._breakers[number] = Breaker(self.config.breaker, rng=self._rng)
        return breaker


def _released(rows: Sequence[OutboxRow], retry_after: float = 0.0) -> list[Outcome]:
    """Hand rows back untried (no attempt spent), due now or after ``retry_after``."""
    return [Outcome(row, "deferred", "lease budget spent", retry_after=retry_after) for row in rows]


class _Sender:
    """Sends one enterprise's claimed rows through its breaker and its key's pacer."""

    def __init__(
        self,
        service: DeliveryService,
        number: str,
        client: RetailCrmClient,
        api_key: Any,
        mapping: MappingConfig,
        *,
        deadline: float = float("inf"),
        lease_end: float = float("inf"),
        margin: float = 0.0,
        events: dict[str, bool] | None = None,
    ) -> None:
        self._service = service
        self._deadline = deadline
        self.lease_end = lease_end  # moved on by every successful extension
        self._margin = margin
        self._number = number
        self._client = client
        self._key = api_key.get_secret_value()
        self._mapping = mapping
        # The enterprise's event options (``retailcrm.events``): a switched-off kind is skipped.
        self.events: dict[str, bool] = events or {}

    def _stop_at(self) -> float:
        return min(self._deadline, self.lease_end - self._margin)

    def out_of_time(self) -> bool:
        return self._service._clock() >= self._stop_at()

    def _left(self) -> float | None:
        """Seconds until no request may start (None: unbounded), for ``asyncio.timeout``."""
        stop = self._stop_at()
        if stop == float("inf"):
            return None
        return max(0.0, stop - self._service._clock())

    async def popup(self, row: OutboxRow) -> Outcome:
        if row.expires_at is not None and row.expires_at < datetime.now(UTC):
            self._service._count(self._number).expired += 1
            return Outcome(row, "expired", "popup expired")
        if row.card_opened is False:
            # Its dial popups were superseded, expired or never sent (an outage, a lost dial):
            # no card is open to close, and the request would only spend the account's budget.
            return Outcome(row, "skipped", "no popup of this call was shown")
        option = "outgoing_popups" if call_type(row.payload) == CALL_OUTGOING else "incoming_popups"
        if self.events.get(option) is False:
            return Outcome(row, "skipped", f"{option} switched off")
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
        settle: Callable[[list[Outcome]], Awaitable[None]],
    ) -> None:
        if self.events.get("call_history") is False:
            await settle([Outcome(row, "skipped", "call_history switched off") for row in rows])
            return
        skipped: list[Outcome] = []
        mapped: list[tuple[OutboxRow, dict[str, Any]]] = []
        for row in rows:
            try:
                call = history_call(row.payload, self._mapping, row.bridges or [])
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
            # One bad call must not sink its batch: find it by sending them one by one, within
            # the same lease budget as every other request (what is left is handed back).
            outcomes: list[Outcome] = []
            for index, (row, call) in enumerate(zip(rows, calls, strict=True)):
                if self.out_of_time():
                    outcomes.extend(_released(rows[index:]))
                    break
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
            try:
                async with asyncio.timeout(self._left()):
                    await service.pacer.acquire(self._key, method)
            except TimeoutError:
                # The key's turn comes after the lease budget: hand the rows back unsent.
                cancelled = True
                breaker.release(permit)
                return _released(rows, retry_after=service.config.rate_limit_retry)
            if method == CALL_EVENT:
                # The wait for the key's turn may have outlived the popup.
                now = datetime.now(UTC)
                if any(r.expires_at is not None and r.expires_at < now for r in rows):
                    cancelled = True
                    breaker.release(permit)
                    service._count(self._number).expired += len(rows)
                    return [Outcome(row, "expired", "popup expired") for row in rows]
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
                service._answered(self._number, ok)

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
