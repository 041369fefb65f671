"""Per-target micro-batching senders: cut batches, POST them, honour per-event results, retry.

Each target has ``max_in_flight`` workers sharing one ``TargetBuffer``, one ``Breaker`` and one
keep-alive ``httpx`` transport (a connection pool, used without a client: ``BatchPoster``). A
worker waits for events, lingers up to ``linger`` for a batch to fill (cut short as soon as
``batch_max`` events wait), asks the breaker for a permit, and POSTs ``{"events": [...]}``. The
target's 202 reply says which events it rejected: those are logged, counted and never retried.
Connect errors, timeouts, 5xx and 429 are retried ``retries`` times with full-jitter backoff
(longer when the target sends ``Retry-After``); a batch still failing goes back to the front of its
queue, where the breaker, not a hot loop, decides when to try again (unless the target answers
others fine: then the batch is halved, see ``_exhausted``). Any other status rejects the batch;
400/413/422 first split it in halves to isolate the culprit.

The workers never raise: an error in the library must not cancel the call service's task group.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx

from vochi_crm_client._backoff import BackoffPolicy, delay, parse_retry_after
from vochi_crm_client._breaker import Breaker, BreakerState, Permit
from vochi_crm_client._buffer import Counters, Entry, TargetBuffer
from vochi_crm_client._config import DispatchConfig
from vochi_crm_client._event import CallEvent
from vochi_crm_client._tasks import BackgroundTasks, log_unexpected

__all__ = ["TargetSender"]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_SPLIT_STATUSES = frozenset({400, 413, 422})
_MIN_NAP = 0.01
_MAX_BREAKER_NAP = 1.0  # wake at least this often while the breaker is open, to expire popups
_REJECTIONS_LOGGED_PER_BATCH = 5


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: Literal["accepted", "retry", "fatal"]
    status: int | None = None
    reply: Any = None
    retry_after: float | None = None
    error: str = ""


def _redact_url(url: str) -> str:
    """The URL without credentials or query, fit for logs and /stats."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"count": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)

    return {
        "count": len(ordered),
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(ordered[-1], 3),
    }


_USER_AGENT = "vochi-crm-client/0.1"


class BatchPoster:
    """POSTs a batch straight through an ``httpx`` transport (the pool), without
    ``httpx.AsyncClient``: its per-request URL merging, auth, redirect and cookie handling was
    about a third of the call service's dispatch CPU in ``benchmarks/peak_calls.py``, and a POST
    to an internal target needs none of it (no proxy from the environment either)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, url: str, *, timeout: float) -> None:
        self._transport = transport
        self._url = httpx.URL(url)
        self._headers = {"content-type": "application/json", "user-agent": _USER_AGENT}
        self._extensions = {"timeout": httpx.Timeout(timeout).as_dict()}

    async def post(self, body: bytes) -> httpx.Response:
        """The target's answer, read in full (the connection goes back to the pool)."""
        request = httpx.Request(
            "POST", self._url, headers=self._headers, content=body, extensions=self._extensions
        )
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


class TargetSender:
    """The queue, breaker and workers of one CRM target."""

    def __init__(
        self,
        *,
        name: str,
        url: str,
        transport: httpx.AsyncBaseTransport,
        config: DispatchConfig,
        breaker: Breaker,
        clock: Clock,
        sleep: Sleep,
        rng: random.Random,
    ) -> None:
        self.name = name
        self.url = url
        self.config = config
        self.breaker = breaker
        self.counters = Counters()
        self.buffer = TargetBuffer(
            max_queue=config.max_queue,
            popup_ttl=config.popup_ttl,
            supersede_after=config.supersede_after,
            counters=self.counters,
        )
        self._poster = BatchPoster(transport, url, timeout=config.attempt_timeout)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._backoff = BackoffPolicy(base=config.backoff_base, cap=config.backoff_max)
        self._wakeup = anyio.Event()
        self._signalled = False  # mirrors self._wakeup.is_set(), cheaper on the hot path
        self._linger_naps: set[anyio.CancelScope] = set()
        self._breaker_naps: set[anyio.CancelScope] = set()
        self._closing = False
        self._workers = 0
        self._idle = anyio.Event()
        self._batch_ms: deque[float] = deque(maxlen=1024)
        self._event_ms: deque[float] = deque(maxlen=4096)

    # -- intake (synchronous, called from emit) ---------------------------------------------

    def put(self, event: CallEvent, enqueued_at: float | None = None) -> None:
        """Queue one event; O(1) amortised, never blocks, never raises for target reasons."""
        self.buffer.put(event, self._clock() if enqueued_at is None else enqueued_at)
        if not self._signalled:
            self._signalled = True
            self._wakeup.set()
        if self._linger_naps and self.buffer.queued >= self.config.batch_max:
            self._poke(self._linger_naps)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, tasks: BackgroundTasks) -> None:
        """Start the workers as tasks of the owner, which stops them by closing ``tasks``.

        The owner's tasks are not reached by its caller's cancellation: a cancelled caller does
        not kill the flush that ``close`` is waiting for.
        """
        for i in range(self.config.max_in_flight):
            self._workers += 1
            tasks.start(self._worker, name=f"vochi-crm-{self.name}-{i}")

    def close(self) -> None:
        """Stop waiting for more events: workers flush what is queued, then exit."""
        self._closing = True
        self._signalled = True
        self._wakeup.set()
        self._poke(self._linger_naps)

    async def wait_idle(self) -> None:
        """Until every worker has exited (the queue is flushed after ``close``)."""
        await self._idle.wait()

    def abandon(self) -> int:
        """Count what is still queued or in flight as lost to shutdown; returns how many."""
        return self.buffer.abandon("shutdown")

    # -- workers -----------------------------------------------------------------------------

    async def _worker(self) -> None:
        try:
            while True:
                try:
                    if not await self._step():
                        return
                except Exception as exc:  # a bug: keep the worker, with the stack trace logged
                    log_unexpected(logger, "dispatch.worker_error", exc, target=self.name)
                    await self._sleep(1.0)
        finally:
            self._workers -= 1
            if self._workers == 0:
                self._idle.set()

    async def _step(self) -> bool:
        cfg, buf = self.config, self.buffer
        if not buf.queued:
            if self._closing:
                return False
            await self._wait_for_events()
            return True
        if buf.queued < cfg.batch_max and not self._closing and cfg.linger > 0:
            await self._nap(self._linger_naps, cfg.linger)
        now = self._clock()
        permit = self.breaker.acquire(now)
        if permit is None:
            buf.expire(now)
            wait = min(_MAX_BREAKER_NAP, max(_MIN_NAP, self.breaker.retry_in(now)))
            await self._nap(self._breaker_naps, wait)
            return True
        batch = buf.take(now, cfg.batch_max, cfg.batch_max_bytes)
        if not batch:
            self._release(permit)
            return True
        await self._deliver(batch, permit)
        return True

    async def _wait_for_events(self) -> None:
        event = self._wakeup
        if self._signalled:
            event = self._wakeup = anyio.Event()
            self._signalled = False
        await event.wait()

    async def _nap(self, naps: set[anyio.CancelScope], seconds: float) -> None:
        with anyio.CancelScope() as scope:
            naps.add(scope)
            try:
                await self._sleep(seconds)
            finally:
                naps.discard(scope)

    @staticmethod
    def _poke(naps: set[anyio.CancelScope]) -> None:
        for scope in list(naps):
            scope.cancel()
        naps.clear()

    # -- delivery ----------------------------------------------------------------------------

    async def _deliver(self, batch: list[Entry], permit: Permit | None) -> None:
        attempt = 0
        try:
            while True:
                live = self._worth_sending(batch)
                if not live:
                    return
                outcome = await self._post(live)
                assert permit is not None
                self._settle(permit, outcome)
                permit = None
                if outcome.kind == "accepted":
                    self._apply_reply(live, outcome.reply)
                    return
                if outcome.kind == "fatal":
                    await self._reject(live, outcome)
                    return
                attempt += 1
                if attempt > self.config.retries:
                    await self._exhausted(live, outcome, attempt)
                    return
                self.counters.retried += len(live)
                await self._sleep(self._retry_delay(attempt, outcome))
                permit = self.breaker.acquire(self._clock())
                if permit is None:
                    self._give_back(live, outcome, attempt)
                    return
                batch = live
        except Exception:
            self.buffer.requeue(batch)  # a bug here must not strand the batch as "in flight"
            raise
        finally:
            if permit is not None:  # cancelled mid-POST, or nothing left to send
                self._release(permit)

    def _worth_sending(self, batch: list[Entry]) -> list[Entry]:
        now = self._clock()
        live = []
        for entry in batch:
            if entry.done:
                continue
            reason = self.buffer.stale_or_doomed(entry, now)
            if reason is None:
                live.append(entry)
            else:
                self.buffer.drop_held(entry, reason)
        return live

    async def _post(self, entries: list[Entry]) -> _Outcome:
        body = b'{"events":[' + b",".join(e.event.wire for e in entries) + b"]}"
        self.counters.batches += 1
        self.counters.sent += len(entries)
        started = self._clock()
        try:
            with anyio.fail_after(self.config.attempt_timeout):
                response = await self._poster.post(body)
        except (TimeoutError, httpx.TimeoutException):
            return _Outcome("retry", error="timeout")
        except httpx.TransportError as exc:
            # Connection refused/reset and protocol errors: the target's dedup by idempotency key
            # makes a resend safe even if the lost request had been committed.
            return _Outcome("retry", error=type(exc).__name__)
        finally:
            self._batch_ms.append((self._clock() - started) * 1000.0)
        status = response.status_code
        if 200 <= status < 300:
            try:
                reply = response.json()
            except ValueError:
                reply = None
            return _Outcome("accepted", status, reply)
        error = f"HTTP {status}"
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(
                response.headers.get("retry-after"), cap=self.config.retry_after_max
            )
            return _Outcome("retry", status, retry_after=retry_after, error=error)
        return _Outcome("fatal", status, error=error)

    def _settle(self, permit: Permit, outcome: _Outcome) -> None:
        # A 4xx proves the target is up: only retryable failures count against the breaker.
        self.breaker.record(permit, outcome.kind != "retry", self._clock())
        self.buffer.degraded = (
            outcome.kind == "retry" or self.breaker.state is not BreakerState.CLOSED
        )
        self._poke(self._breaker_naps)

    def _release(self, permit: Permit) -> None:
        self.breaker.release(permit)
        self._poke(self._breaker_naps)

    def _apply_reply(self, entries: list[Entry], reply: Any) -> None:
        rejected: dict[int, str] = {}
        duplicates = 0
        if isinstance(reply, dict):
            for item in reply.get("rejected") or ():
                if isinstance(item, dict) and isinstance(item.get("index"), int):
                    rejected[item["index"]] = str(item.get("error", ""))[:200]
            if isinstance(reply.get("duplicates"), int):
                duplicates = reply["duplicates"]
        now = self._clock()
        logged = 0
        for index, entry in enumerate(entries):
            if index in rejected:
                if logged < _REJECTIONS_LOGGED_PER_BATCH:
                    logger.warning(
                        "dispatch.event_rejected target=%s key=%s error=%s",
                        self.name,
                        entry.event.idempotency_key,
                        rejected[index],
                    )
                    logged += 1
                self.buffer.drop_held(entry, "rejected")
                self.counters.rejected += 1
            else:
                self.counters.delivered += 1
                self._event_ms.append((now - entry.enqueued_at) * 1000.0)
        self.counters.duplicates += duplicates
        self.buffer.settle(entries)

    async def _exhausted(self, entries: list[Entry], outcome: _Outcome, attempts: int) -> None:
        """Retries are spent: wait at the front of the queue for the breaker, unless the batch
        itself looks like the problem.

        That is when the target answers (a 5xx, not a connect error or a timeout) while its
        breaker stays closed: then the batch is halved, and a lone failing event goes to the
        back of its queue, so one event the target chokes on cannot hold the others back
        (halving may reorder the halves; the service tolerates reordered events).
        """
        if self.breaker.state is not BreakerState.CLOSED or outcome.status is None:
            self._give_back(entries, outcome, attempts)
        elif len(entries) > 1:
            await self._halves(entries)
        else:
            self._give_back(entries, outcome, attempts, front=False)

    async def _halves(self, entries: list[Entry]) -> None:
        middle = len(entries) // 2
        for half in (entries[:middle], entries[middle:]):
            permit = self.breaker.acquire(self._clock())
            if permit is None:
                self.buffer.requeue(half)
            else:
                await self._deliver(half, permit)

    async def _reject(self, entries: list[Entry], outcome: _Outcome) -> None:
        if len(entries) > 1 and outcome.status in _SPLIT_STATUSES:
            await self._halves(entries)
            return
        logger.warning(
            "dispatch.batch_rejected target=%s status=%s events=%d first_key=%s",
            self.name,
            outcome.status,
            len(entries),
            entries[0].event.idempotency_key,
        )
        for entry in entries:
            self.buffer.drop_held(entry, "rejected")
        self.counters.rejected += len(entries)

    def _give_back(
        self, entries: list[Entry], outcome: _Outcome, attempts: int, *, front: bool = True
    ) -> None:
        self.counters.batches_failed += 1
        logger.warning(
            "dispatch.batch_failed target=%s events=%d attempts=%d error=%s",
            self.name,
            len(entries),
            attempts,
            outcome.error,
        )
        self.buffer.requeue(entries, front=front)

    def _retry_delay(self, attempt: int, outcome: _Outcome) -> float:
        wait = delay(attempt, self._backoff, self._rng)
        if outcome.retry_after is not None:  # already capped at retry_after_max
            wait = max(wait, outcome.retry_after)
        return wait

    # -- observation -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        c = self.counters
        by_enterprise = self.buffer.queued_by_enterprise()
        busiest = sorted(by_enterprise.items(), key=lambda kv: -kv[1])[:5]
        return {
            "url": _redact_url(self.url),
            "queued": self.buffer.queued,
            "in_flight": self.buffer.held,
            "queued_enterprises": len(by_enterprise),
            "busiest_enterprises": dict(busiest),
            "enqueued": c.enqueued,
            "sent": c.sent,
            "delivered": c.delivered,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            "retried": c.retried,
            "requeued": c.requeued,
            "batches": c.batches,
            "batches_failed": c.batches_failed,
            "dropped": dict(c.dropped),
            "breaker": self.breaker.stats(),
            "latency_ms": {
                "batch": _percentiles(self._batch_ms),
                "event": _percentiles(self._event_ms),
            },
        }
