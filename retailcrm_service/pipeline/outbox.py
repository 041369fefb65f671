"""The durable outbox: group-committed intake, leased claims, retries, dead letters, replay.

Intake (``GroupCommitter``): request handlers ``await committer.submit(events)``; every request that
arrives while a transaction is in flight joins the next one, so many concurrent requests share one
commit. ``submit`` returns only after the commit (the 202 is sent after it), and tells which events
were new and which were duplicates (``INSERT ... ON CONFLICT DO NOTHING`` on the per-enterprise
idempotency key). Events of unknown or disabled enterprises are stored as ``skipped``.

Delivery side (``OutboxStore``): ``claim`` takes due rows with ``FOR UPDATE SKIP LOCKED`` and a
lease, at most one row per call at a time and only when no earlier row of the call is pending, so
a call's events go out in order. ``settle`` records the outcome of an attempt: delivered, retry
later (persisted due time, attempt count, last error), dead past the maximum attempts or age,
expired popups. A worker that dies simply lets its lease lapse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Final

import asyncpg

from retailcrm_service.crm.mapping import KIND_HISTORY, KIND_POPUP, kinds_for
from retailcrm_service.storage.database import DATABASE_ERRORS
from vochi_crm_client import BackgroundTasks, BackoffPolicy, delay, enabled_sql, log_unexpected

logger = logging.getLogger(__name__)

TABLE = "retailcrm_outbox"

FINAL_STATES = ("delivered", "expired", "superseded", "dead", "skipped")


class OutboxError(Exception):
    """Base of the outbox's errors."""


class OutboxUnavailable(OutboxError):
    """The events could not be committed (the database failed); nothing of them was stored."""


class OutboxClosed(OutboxError):
    """The committer is not accepting events (not started, or shutting down)."""


class OutboxFull(OutboxError):
    """More events wait for a commit than ``OutboxConfig.max_queued_events``; nothing was queued."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One validated event, ready to be inserted."""

    enterprise_number: str
    event_type: str
    call_unique_id: str
    payload: dict[str, Any]
    origin: str
    idempotency_key: str
    occurred_at: datetime | None = None
    payload_json: str = ""  # the payload already encoded (the intake's validation does it)

    @property
    def kinds(self) -> tuple[str, ...]:
        return kinds_for(self.event_type, self.origin)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxConfig:
    """Intake and delivery policy; defaults are production values."""

    popup_ttl: float = 30.0
    # A dial whose call's hangup is queued is superseded once it has waited this long (see
    # _SUPERSEDE); the call services' buffers drop such popups after the same second.
    supersede_after: float = 1.0
    lease_seconds: float = 60.0
    # History must outlive long outages (breaker deferrals spend no attempts); past these it is
    # dead-lettered, and POST /api/events/replay brings it back.
    max_attempts: int = 200
    max_age: float = 3 * 24 * 3600.0
    retry: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(base=1.0, cap=300.0))
    commit_max_events: int = 5000
    commit_concurrency: int = 1
    # The longest a request waits for its commit, from its arrival, queueing included; past it
    # the request is answered 503 and nothing of it is stored. It must stay below the call
    # services' attempt timeout (the library's DispatchConfig.attempt_timeout, 2.5 s): the
    # client then hears how its attempt ended before it gives up on it, so its retry never runs
    # beside the original.
    commit_timeout: float = 2.0
    # At most this many events wait for a commit; a request that would exceed it is answered
    # 503 with Retry-After at once, instead of piling up behind a slow database.
    max_queued_events: int = 50_000
    retention_days: float = 7.0
    # A call's history comes due on a grid of this many seconds (after its hangup popup), so
    # that one calls/upload carries every call of the account that ended within the interval:
    # at 10 calls/s per account, 0.5 s makes about 5 calls per request instead of one, which
    # keeps a busy account's telephony budget for popups. 0 uploads each call at once.
    history_gather: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.history_gather <= 60:
            raise ValueError("history_gather must be between 0 and 60 seconds")
        if self.popup_ttl <= 0 or self.lease_seconds <= 0 or self.max_age <= 0:
            raise ValueError("popup_ttl, lease_seconds and max_age must be positive")
        if self.supersede_after < 0:
            raise ValueError("supersede_after must not be negative")
        if self.max_attempts < 1 or self.commit_max_events < 1 or self.commit_concurrency < 1:
            raise ValueError("max_attempts, commit_max_events, commit_concurrency must be >= 1")
        if self.commit_timeout <= 0 or self.max_queued_events < 1:
            raise ValueError("commit_timeout must be positive and max_queued_events >= 1")


# -- intake -------------------------------------------------------------------------------------

# Every commit that stores new rows sends one NOTIFY on this channel (delivered by PostgreSQL at
# commit, folded to one per transaction): the delivery workers of every instance listen to it, so
# rows committed by one instance are claimed at once by any other, not at its next poll. The
# payload reads as a change of every enterprise to ``vochi_crm_client.parse_change``.
NOTIFY_CHANNEL = "retailcrm_outbox"
NOTIFY_PAYLOAD = '{"enterprise_number":"*"}'

# One JSON document per statement: a single C-level dumps in Python and a single parameter to
# encode, instead of nine arrays (the intake is CPU-bound on small machines). The answer is one
# row: how many rows were inserted and, only when that is fewer than sent (duplicates), which.
# The platform's "enabled" rule, the one the call services' matrix applies (the library's).
_RETAILCRM_ON = enabled_sql("e.active", "e.integrations_config -> 'retailcrm'")

_INSERT = f"""
WITH ins AS (
INSERT INTO retailcrm_outbox (enterprise_number, idempotency_key, kind, has_history, call_unique_id,
                     event_type, origin, payload, occurred_at, state, expires_at, last_error,
                     finished_at)
SELECT i.en, i.ikey, i.kind, i.hist, i.cuid, i.etype, i.origin, i.payload, i.occ,
       CASE WHEN e.number IS NULL OR NOT {_RETAILCRM_ON} OR i.kind = 'note'
            THEN CASE WHEN i.kind = 'note' AND e.number IS NOT NULL THEN 'delivered'
                      ELSE 'skipped' END
            ELSE 'pending' END,
       CASE WHEN i.kind = 'popup' THEN now() + make_interval(secs => $2) END,
       CASE WHEN e.number IS NULL THEN 'unknown enterprise'
            WHEN NOT {_RETAILCRM_ON} THEN 'retailcrm disabled' END,
       CASE WHEN i.kind = 'note' OR e.number IS NULL OR NOT {_RETAILCRM_ON}
            THEN now() END
FROM ROWS FROM (json_to_recordset($1::json) AS (en text, ikey text, kind text, hist boolean,
                cuid text, etype text, origin text, payload json, occ timestamptz))
     WITH ORDINALITY AS i(en, ikey, kind, hist, cuid, etype, origin, payload, occ, ord)
LEFT JOIN enterprises e ON e.number = i.en
ORDER BY i.ord
ON CONFLICT (enterprise_number, idempotency_key) DO NOTHING
RETURNING enterprise_number, idempotency_key)
SELECT n, CASE WHEN n < $3 THEN (SELECT array_agg(enterprise_number) FROM ins) END AS ens,
          CASE WHEN n < $3 THEN (SELECT array_agg(idempotency_key) FROM ins) END AS ikeys,
          CASE WHEN n > 0 THEN pg_notify($4, $5)::text END AS notified
FROM (SELECT count(*) AS n FROM ins) AS counted
"""  # noqa: S608 (built from constants)


# The C string encoder json.dumps uses, without its per-call overhead (hot path).
_string: Callable[[str], str] = json.encoder.encode_basestring


def encode_row(ev: StoredEvent) -> str:
    """One event as an element of the insert's JSON document."""
    kinds = ev.kinds
    payload = ev.payload_json or json.dumps(
        ev.payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    occurred = "null" if ev.occurred_at is None else _string(ev.occurred_at.isoformat())
    return (
        f'{{"en":{_string(ev.enterprise_number)},"ikey":{_string(ev.idempotency_key)},'
        f'"kind":"{kinds[0]}","hist":{"true" if KIND_HISTORY in kinds[1:] else "false"},'
        f'"cuid":{_string(ev.call_unique_id)},"etype":{_string(ev.event_type)},'
        f'"origin":{_string(ev.origin)},"occ":{occurred},"payload":{payload}}}'
    )


async def insert_rows(
    conn: asyncpg.Connection, rows: Mapping[tuple[str, str], str], *, popup_ttl: float
) -> set[tuple[str, str]]:
    """Insert encoded rows (by distinct (enterprise, key)) in one statement; returns the keys
    that were new."""
    document = "[" + ",".join(rows.values()) + "]"
    answer = await conn.fetchrow(
        _INSERT, document, popup_ttl, len(rows), NOTIFY_CHANNEL, NOTIFY_PAYLOAD
    )
    assert answer is not None
    if answer["n"] == len(rows):
        return set(rows)
    return set(zip(answer["ens"] or (), answer["ikeys"] or (), strict=True))


@dataclass(slots=True)
class _Pending:
    # Encoded at submit: a request waiting for its commit then holds only strings, which the
    # cyclic GC never tracks. Holding the decoded events (hundreds of dicts and lists per
    # request) across the commit promoted them to the old generations, and the full
    # collections that followed stalled the event loop.
    rows: list[str]
    keys: list[tuple[str, str]]
    done: asyncio.Future[list[bool]]
    deadline: float  # loop time by which the request must have its answer


class GroupCommitter:
    """Coalesces concurrent ``submit`` calls into few transactions (see module docstring)."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        config: OutboxConfig | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._config = config or OutboxConfig()
        self._on_commit = on_commit
        self._queue: deque[_Pending] = deque()
        self._queued_events = 0
        self._last_batch = 0
        self._wakeup = asyncio.Event()
        self._tasks = BackgroundTasks("outbox-committer", logger=logger)
        self._closing = False
        self.transactions = 0
        self.committed_events = 0
        self.failed_transactions = 0
        self.refused_full = 0
        self.timed_out_requests = 0

    async def __aenter__(self) -> GroupCommitter:
        self._tasks.open()
        for i in range(self._config.commit_concurrency):
            self._tasks.start(self._worker, name=f"outbox-committer-{i}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wakeup.set()
        # The workers commit what is queued, then exit; leaving on an error cancels them.
        await self._tasks.close(grace=math.inf if exc_type is None else 0.0)

    def submit(self, events: Sequence[StoredEvent]) -> Awaitable[list[bool]]:
        """Queue ``events`` for the next commit; the awaitable gives, per event, True when new
        and False when a duplicate, once they are committed.

        The events are encoded here and not referenced afterwards (see ``_Pending``). Raises
        ``OutboxClosed`` at once when not accepting and ``OutboxFull`` when too many events
        already wait; the awaitable raises ``OutboxUnavailable`` when the transaction failed or
        the commit did not happen within ``commit_timeout`` (nothing of it was stored).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[bool]] = loop.create_future()
        if not events:
            done.set_result([])
            return done
        if not self._tasks.is_open or self._closing:
            raise OutboxClosed("the outbox is not accepting events")
        if self._queued_events + len(events) > self._config.max_queued_events:
            self.refused_full += 1
            raise OutboxFull(f"more than {self._config.max_queued_events} events wait")
        rows = [encode_row(ev) for ev in events]
        keys = [(ev.enterprise_number, ev.idempotency_key) for ev in events]
        deadline = loop.time() + self._config.commit_timeout
        self._queue.append(_Pending(rows, keys, done, deadline))
        self._queued_events += len(rows)
        self._wakeup.set()
        # Shielded: a caller that goes away does not cancel the commit others share.
        return asyncio.shield(done)

    def stats(self) -> dict[str, Any]:
        return {
            "transactions": self.transactions,
            "committed_events": self.committed_events,
            "failed_transactions": self.failed_transactions,
            "queued_requests": len(self._queue),
            "queued_events": self._queued_events,
            "refused_full": self.refused_full,
            "timed_out_requests": self.timed_out_requests,
        }

    async def _worker(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._drain()

    async def _drain(self) -> None:
        """Commit batches on one connection for as long as requests keep coming: back-to-back
        commits skip the pool's acquire and its connection reset (a round trip each), and the
        next batch is sent before the waiters of the last one are answered."""
        try:
            async with asyncio.timeout_at(self._queue[0].deadline):
                conn = await self._pool.acquire()
        except Exception as exc:  # DATABASE_ERRORS, or a bug: the waiters must hear either
            self._fail(self._take(), exc)
            return
        try:
            while self._queue:
                batch = self._take()
                if batch and not await self._commit(conn, batch):
                    return  # after a failure the connection goes back (the pool checks it)
        finally:
            try:
                await self._pool.release(conn, timeout=self._config.commit_timeout)
            except Exception as exc:  # the pool has closed it; the next batch gets another
                logger.warning("outbox.connection_dropped error=%s", type(exc).__name__)

    def _take(self) -> list[_Pending]:
        # Aim for two cohorts of requests of about equal size, one committing while the other
        # is being received and parsed: at most half of what just committed plus what waits.
        # Taking the whole queue lets every caller pile into one big commit, followed by a tiny
        # one while they all come back at once; PostgreSQL and the handlers then take turns
        # instead of overlapping (measured: commits of 1500, 100, 1500, 100 events...).
        limit = min(self._config.commit_max_events, (self._last_batch + self._queued_events) // 2)
        batch: list[_Pending] = []
        expired: list[_Pending] = []
        size = 0
        now = asyncio.get_running_loop().time()
        while self._queue and (not batch or size < limit):
            item = self._queue.popleft()
            self._queued_events -= len(item.rows)
            if item.deadline <= now:  # its caller is owed an answer already: not committed
                expired.append(item)
                continue
            batch.append(item)
            size += len(item.rows)
        if expired:
            self.timed_out_requests += len(expired)
            error = OutboxUnavailable("the events waited longer than commit_timeout")
            for item in expired:
                if not item.done.done():
                    item.done.set_exception(error)
        self._last_batch = size
        return batch

    async def _commit(self, conn: asyncpg.Connection, batch: list[_Pending]) -> bool:
        unique: dict[tuple[str, str], str] = {}
        for item in batch:
            for key, row in zip(item.keys, item.rows, strict=True):
                unique.setdefault(key, row)
        try:
            # A request must not hang on a database that stopped answering: by the deadline of
            # the oldest request in the batch every caller gets an error and retries
            # (duplicates are harmless). One statement is one atomic transaction: no
            # BEGIN/COMMIT round trips.
            async with asyncio.timeout_at(min(item.deadline for item in batch)):
                new = await insert_rows(conn, unique, popup_ttl=self._config.popup_ttl)
        except Exception as exc:  # DATABASE_ERRORS, or a bug: the waiters must hear either
            self._fail(batch, exc)
            return False
        except asyncio.CancelledError:
            self._fail(batch, OutboxClosed("the outbox closed while committing"))
            raise
        self.transactions += 1
        self.committed_events += len(new)
        for item in batch:
            if not item.done.done():
                item.done.set_result(_claim_new(item.keys, new))
        if new and self._on_commit is not None:
            self._on_commit()
        return True

    def _fail(self, batch: list[_Pending], exc: BaseException) -> None:
        if not batch:
            return
        self.failed_transactions += 1
        events = sum(len(item.rows) for item in batch)
        if isinstance(exc, (*DATABASE_ERRORS, OutboxClosed)):
            logger.warning("outbox.commit_failed events=%d error=%s", events, type(exc).__name__)
        else:  # a bug: keep its stack trace
            log_unexpected(logger, "outbox.commit_failed", exc, events=events)
        error = OutboxUnavailable("the database did not commit the events")
        error.__cause__ = exc
        for item in batch:
            if not item.done.done():
                item.done.set_exception(error)


def _claim_new(keys: Sequence[tuple[str, str]], new: set[tuple[str, str]]) -> list[bool]:
    """Per event, True for the first occurrence of a newly inserted key, False otherwise."""
    flags = []
    for key in keys:
        if key in new:
            new.discard(key)
            flags.append(True)
        else:
            flags.append(False)
    return flags


# -- delivery side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A claimed row."""

    id: int
    enterprise_number: str
    idempotency_key: str
    kind: str
    has_history: bool
    call_unique_id: str
    event_type: str
    origin: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime
    expires_at: datetime | None
    # A history row's call's bridge payloads, oldest first (read by the claim; None otherwise).
    bridges: list[dict[str, Any]] | None = None
    # A hangup popup's: whether a dial popup of its call was delivered, i.e. whether RetailCRM
    # shows a card that the hangup would close (read by the claim; None otherwise: send it).
    card_opened: bool | None = None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> OutboxRow:
        payload = r["payload"]
        bridges = r.get("bridges")
        return cls(
            id=r["id"],
            enterprise_number=r["enterprise_number"],
            idempotency_key=r["idempotency_key"],
            kind=r["kind"],
            has_history=r["has_history"],
            call_unique_id=r["call_unique_id"],
            event_type=r["event_type"],
            origin=r["origin"],
            payload=json.loads(payload) if isinstance(payload, str) else dict(payload),
            attempts=r["attempts"],
            created_at=r["created_at"],
            expires_at=r["expires_at"],
            bridges=json.loads(bridges) if isinstance(bridges, str) else bridges,
            card_opened=r.get("card_opened"),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt on a row ended."""

    row: OutboxRow
    result: str  # "delivered" | "retry" | "dead" | "skipped" | "expired" | "deferred"
    error: str | None = None
    retry_after: float | None = None


# The dial and hangup lookups below name the earlier rows (``id < o.id``): correct (a dial after
# its hangup is never sent, so a delivered dial is always the earlier row), and it keeps each
# lookup a probe of the call's index; the update takes the candidates by primary key. With only
# equalities, PostgreSQL ran ``card_opened`` as one hashed scan of the whole outbox, and the update
# as a hash join over another, on every claim: a cost that grows with the retention.
_CLAIM = """
WITH candidates AS (
    SELECT o.id FROM retailcrm_outbox o
    WHERE o.state = 'pending' AND o.due_at <= now()
      AND (o.lease_until IS NULL OR o.lease_until < now())
      AND o.enterprise_number <> ALL($4::text[])
      AND NOT EXISTS (
          SELECT 1 FROM retailcrm_outbox p
          WHERE p.enterprise_number = o.enterprise_number
            AND p.call_unique_id = o.call_unique_id
            AND p.id < o.id AND p.state = 'pending')
      AND NOT (o.kind = 'popup' AND o.event_type = 'dial' AND EXISTS (
          SELECT 1 FROM retailcrm_outbox h
          WHERE h.enterprise_number = o.enterprise_number
            AND h.call_unique_id = o.call_unique_id
            AND h.id < o.id AND h.event_type = 'hangup'))
    ORDER BY o.due_at, o.id
    LIMIT $2
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE retailcrm_outbox o
SET lease_owner = $1, lease_until = now() + make_interval(secs => $3), attempts = o.attempts + 1
WHERE o.id = ANY(ARRAY(SELECT id FROM candidates))
RETURNING o.*, CASE WHEN o.kind = 'history' THEN (
    SELECT coalesce(json_agg(b.payload ORDER BY b.id), '[]') FROM retailcrm_outbox b
    WHERE b.enterprise_number = o.enterprise_number AND b.call_unique_id = o.call_unique_id
      AND b.kind = 'note') END AS bridges,
    CASE WHEN o.kind = 'popup' AND o.event_type = 'hangup' THEN EXISTS (
    SELECT 1 FROM retailcrm_outbox d
    WHERE d.enterprise_number = o.enterprise_number AND d.call_unique_id = o.call_unique_id
      AND d.id < o.id AND d.event_type = 'dial' AND d.state = 'delivered') END AS card_opened
"""

# Popups whose time is up: a dial row ends as expired; a live hangup moves on to its history.
_EXPIRE = """
UPDATE retailcrm_outbox
SET state = CASE WHEN has_history THEN 'pending' ELSE 'expired' END,
    kind = CASE WHEN has_history THEN 'history' ELSE kind END,
    popup_state = 'expired', attempts = CASE WHEN has_history THEN 0 ELSE attempts END,
    due_at = now(), lease_owner = NULL, lease_until = NULL,
    finished_at = CASE WHEN has_history THEN NULL ELSE now() END
WHERE state = 'pending' AND kind = 'popup' AND expires_at < now()
  AND (lease_until IS NULL OR lease_until < now())
RETURNING enterprise_number
"""

# A dial popup is pointless once the call's hangup is queued, when it already failed (it would
# open a card for a call that is over), when it is late (waiting longer than supersede_after:
# a breaker deferral gives its attempt back, so without this the dials of an outage were all
# shown, up to popup_ttl late, ahead of the fresh ones once RetailCRM was back; the library's
# buffers use the same rule), or when it arrived after the hangup (senders may reorder batches;
# the claim above never sends such a late dial).
_SUPERSEDE = """
UPDATE retailcrm_outbox o
SET state = 'superseded', popup_state = 'superseded', finished_at = now(),
    lease_owner = NULL, lease_until = NULL
WHERE o.state = 'pending' AND o.kind = 'popup' AND o.event_type = 'dial'
  AND (o.lease_until IS NULL OR o.lease_until < now())
  AND EXISTS (SELECT 1 FROM retailcrm_outbox h
              WHERE h.enterprise_number = o.enterprise_number
                AND h.call_unique_id = o.call_unique_id
                AND h.event_type = 'hangup'
                AND (h.id < o.id OR o.attempts > 0
                     OR o.created_at < now() - make_interval(secs => $1)))
RETURNING enterprise_number
"""


# The outcomes of one pass (see ``OutboxStore.settle``), one statement: "history" (a live
# hangup's popup is done, the row goes on as history, due at the next tick of the history_gather
# grid, attempts afresh), "later" (retry or deferred: due after the wait; a deferral gives its
# attempt back), "final" (delivered, dead, expired, skipped: the row is finished). Only rows this
# instance still leases are touched; the SET expressions read the row as it was (``o.kind`` is
# the kind before this update).
_SETTLE = """
UPDATE retailcrm_outbox o SET
    kind = CASE WHEN u.op = 'history' THEN 'history' ELSE o.kind END,
    popup_state = CASE WHEN u.op = 'history' THEN u.result
                       WHEN u.op = 'final' AND o.kind = 'popup' THEN u.result
                       ELSE o.popup_state END,
    attempts = CASE WHEN u.op = 'history' THEN 0
                    WHEN u.op = 'later' THEN o.attempts - u.refund
                    ELSE o.attempts END,
    due_at = CASE WHEN u.op = 'history' THEN coalesce(to_timestamp($8::float8), now())
                  WHEN u.op = 'later' THEN now() + make_interval(secs => u.wait)
                  ELSE o.due_at END,
    state = CASE WHEN u.op = 'final' THEN u.result ELSE o.state END,
    finished_at = CASE WHEN u.op = 'final' THEN now() ELSE o.finished_at END,
    last_error = u.error,
    lease_owner = NULL,
    lease_until = NULL
FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::int[])
     AS u(id, op, result, error, wait, refund)
WHERE o.id = u.id AND o.lease_owner = $1
"""

# Settled rows past the retention go, a bounded batch per sweep (the journal keeps the trace).
_PURGE = """
DELETE FROM retailcrm_outbox WHERE id IN (
    SELECT id FROM retailcrm_outbox
    WHERE state <> 'pending' AND finished_at < now() - make_interval(secs => $1)
    LIMIT 5000)
"""


# Changes since the last ANALYZE past which ``keep_statistics`` runs one (and past the row count).
_ANALYZE_MIN_CHANGES: Final = 1000


class OutboxStore:
    """SQL of the delivery side; every method is one short transaction."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        owner: str,
        config: OutboxConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self.owner = owner
        self.config = config or OutboxConfig()
        self._rng = rng or random.Random()
        self.leases_released = 0  # rows of dead instances handed back by heartbeat()
        # Wall-clock time of the latest history_gather tick this instance's settles made rows
        # due at (0: none): an idle delivery loop wakes for it.
        self.history_tick = 0.0

    async def claim(self, limit: int, *, exclude: Sequence[str] = ()) -> list[OutboxRow]:
        rows = await self._pool.fetch(
            _CLAIM, self.owner, limit, self.config.lease_seconds, list(exclude)
        )
        return [OutboxRow.from_record(r) for r in rows]

    async def expedite(self, enterprise_number: str) -> int:
        """Make the enterprise's pending rows that wait for a later retry due now (none leased);
        returns how many."""
        result = await self._pool.execute(
            """UPDATE retailcrm_outbox SET due_at = now()
                WHERE enterprise_number = $1 AND state = 'pending' AND due_at > now()
                  AND (lease_until IS NULL OR lease_until < now())""",
            enterprise_number,
        )
        return int(result.split()[-1])

    async def extend(self, ids: Sequence[int]) -> int:
        """Renew this owner's leases on those of ``ids`` still pending; returns how many."""
        result = await self._pool.execute(
            """UPDATE retailcrm_outbox SET lease_until = now() + make_interval(secs => $3)
                WHERE id = ANY($2::bigint[]) AND lease_owner = $1 AND state = 'pending'""",
            self.owner,
            list(ids),
            self.config.lease_seconds,
        )
        return int(result.split()[-1])

    async def sweep(self) -> dict[str, list[str]]:
        """Expire stale popups and supersede failed dials; returns enterprises per outcome."""
        async with self._pool.acquire() as conn, conn.transaction():
            expired = await conn.fetch(_EXPIRE)
            superseded = await conn.fetch(_SUPERSEDE, self.config.supersede_after)
            await conn.execute(_PURGE, self.config.retention_days * 86400.0)
        return {
            "expired": [r["enterprise_number"] for r in expired],
            "superseded": [r["enterprise_number"] for r in superseded],
        }

    async def heartbeat(self, *, alive_within: float, dead_after: float | None = None) -> int:
        """Mark this instance alive; returns how many instances were alive within the window.

        An instance silent for ``dead_after`` seconds (default: ten windows) is taken for dead:
        the leases it still holds are released, so that its claimed rows go out again now
        instead of when their leases run out (a killed instance's rows waited the whole lease).
        A silent instance that was only stalled loses nothing by it: its settles of released
        rows match nothing (they check the owner), and a row it had sent may be sent once more
        (a popup shown again; an upload RetailCRM deduplicates).
        """
        dead_after = alive_within * 10 if dead_after is None else dead_after
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO retailcrm_delivery_instances (owner) VALUES ($1)
                   ON CONFLICT (owner) DO UPDATE SET seen_at = now()""",
                self.owner,
            )
            dead = await conn.fetch(
                "DELETE FROM retailcrm_delivery_instances"
                " WHERE seen_at < now() - make_interval(secs => $1) RETURNING owner",
                dead_after,
            )
            if dead:
                owners = [r["owner"] for r in dead]
                released = await conn.fetchval(
                    """WITH released AS (
                           UPDATE retailcrm_outbox SET lease_owner = NULL, lease_until = NULL
                           WHERE state = 'pending' AND lease_owner = ANY($1::text[])
                           RETURNING 1)
                       SELECT count(*) FROM released""",
                    owners,
                )
                self.leases_released += int(released)
                logger.warning(
                    "outbox.dead_instances owners=%d leases_released=%d", len(owners), released
                )
            count = await conn.fetchval(
                "SELECT count(*) FROM retailcrm_delivery_instances"
                " WHERE seen_at >= now() - make_interval(secs => $1)",
                alive_within,
            )
        return max(1, int(count))

    async def keep_statistics(self) -> bool:
        """``ANALYZE`` the outbox when its planner statistics lag far behind it; True if it did.

        A fresh outbox (a new deployment, a test, a benchmark) grows from nothing faster than
        autovacuum's first visit; planned on an "empty" table, the claim sorts every due row
        instead of walking the due index, and gets slower as the backlog grows: a collapse, not a
        slowdown. One ``ANALYZE`` (a sample, milliseconds) fixes the plans, and plans cached on
        the old statistics are invalidated with it. Past that, autovacuum keeps up (004/008).
        """
        row = await self._pool.fetchrow(
            """SELECT n_live_tup, n_mod_since_analyze FROM pg_stat_user_tables
                WHERE relid = 'retailcrm_outbox'::regclass"""
        )
        if row is None or row["n_mod_since_analyze"] < max(_ANALYZE_MIN_CHANGES, row["n_live_tup"]):
            return False
        await self._pool.execute("ANALYZE retailcrm_outbox")
        return True

    async def leave(self) -> None:
        """This instance stops delivering: the others take its share at once."""
        await self._pool.execute(
            "DELETE FROM retailcrm_delivery_instances WHERE owner = $1", self.owner
        )

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Persist the outcomes of one pass of attempts (rows whose lease we lost are left).

        One statement for the whole pass (one round trip, atomic by itself); delivery settles
        through ``GroupSettler``, which passes concurrent workers' outcomes here together.
        """
        if not outcomes:
            return
        ids: list[int] = []
        ops: list[str] = []
        results: list[str] = []
        errors: list[str | None] = []
        waits: list[float] = []
        refunds: list[int] = []
        for outcome in outcomes:
            row = outcome.row
            result = outcome.result
            if result == "retry" and self._exhausted(row):
                result = "dead"
            if row.kind == KIND_POPUP and row.has_history and result not in ("retry", "deferred"):
                op = "history"  # the popup part is settled either way; on to its history
            elif result in ("retry", "deferred"):
                op = "later"
            else:
                op = "final"
            ids.append(row.id)
            ops.append(op)
            results.append(result)
            errors.append(outcome.error)
            waits.append(self._retry_delay(row, outcome) if op == "later" else 0.0)
            refunds.append(1 if result == "deferred" else 0)
        gather = self.config.history_gather
        tick: float | None = None  # None: history rows are due at once
        if gather > 0 and "history" in ops:
            tick = math.ceil(time.time() / gather) * gather
        await self._pool.execute(
            _SETTLE, self.owner, ids, ops, results, errors, waits, refunds, tick
        )
        if tick is not None:
            self.history_tick = max(self.history_tick, tick)

    def _exhausted(self, row: OutboxRow) -> bool:
        if row.attempts >= self.config.max_attempts:
            return True
        age = (datetime.now(row.created_at.tzinfo) - row.created_at).total_seconds()
        return age >= self.config.max_age

    def _retry_delay(self, row: OutboxRow, outcome: Outcome) -> float:
        if outcome.retry_after is not None and math.isfinite(outcome.retry_after):
            # Never past the longest backoff: a server's hint must not park a row for years.
            return min(max(0.0, outcome.retry_after), self.config.retry.cap)
        return delay(max(1, row.attempts), self.config.retry, self._rng)

    # -- observability and replay -----------------------------------------------------------

    async def backlog(self) -> dict[str, Any]:
        row = await self._pool.fetchrow(
            """SELECT count(*) AS pending,
                       count(*) FILTER (WHERE due_at <= now()) AS due,
                       min(due_at) FILTER (WHERE due_at <= now()) AS oldest_due,
                       extract(epoch FROM now() - min(due_at) FILTER (WHERE due_at <= now()))
                           AS oldest_due_age
                FROM retailcrm_outbox WHERE state = 'pending'"""
        )
        return {
            "pending": row["pending"],
            "due": row["due"],
            "oldest_due_at": row["oldest_due"].isoformat() if row["oldest_due"] else None,
            "oldest_due_age_seconds": round(float(row["oldest_due_age"] or 0.0), 3),
        }


class GroupSettler:
    """Concurrent settles share one statement: group commit for the delivery side.

    Every enterprise's worker settles after each request (so a crash re-sends at most what was
    in flight). With many enterprises delivering at once, one ``UPDATE`` per request was the
    delivery side's largest database cost; here the first caller runs the statement and those
    arriving meanwhile wait and go together in the next one. Each caller returns once its own
    outcomes are stored, or raises what storing them raised (its rows stay leased and are
    claimed again when the lease lapses: at least once, never lost).

    The first caller waits ``linger`` seconds before the statement, so that settles arriving
    within it go together even when no statement is running (steady load: the requests of
    different enterprises end a few ms apart). Each enterprise still has at most one unsettled
    request: its worker sends the next only once this returns.
    """

    def __init__(self, store: OutboxStore, *, linger: float = 0.0) -> None:
        self._store = store
        self._linger = linger
        self._queue: list[tuple[Sequence[Outcome], asyncio.Future[None]]] = []
        self._flushing = False
        self.statements = 0
        self.settled = 0

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((outcomes, done))
        if not self._flushing:
            try:
                await self._lead()
            except BaseException:
                if done.done() and not done.cancelled():
                    done.exception()  # retrieved: the caller gets the cancellation instead
                raise
        await done

    async def _lead(self) -> None:
        self._flushing = True
        batch: list[tuple[Sequence[Outcome], asyncio.Future[None]]] = []
        try:
            if self._linger:
                await asyncio.sleep(self._linger)
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self._store.settle([o for outcomes, _ in batch for o in outcomes])
                except Exception as exc:
                    _resolve(batch, exc)
                else:
                    self.statements += 1
                    self.settled += sum(len(outcomes) for outcomes, _ in batch)
                    _resolve(batch, None)
                batch = []
        finally:
            self._flushing = False
            # Cancelled while leading (shutdown): nobody is left to run the others' statement.
            _resolve([*batch, *self._queue], RuntimeError("settle interrupted"))
            self._queue = []


def _resolve(
    batch: Sequence[tuple[Sequence[Outcome], asyncio.Future[None]]], exc: BaseException | None
) -> None:
    for _, done in batch:
        if done.done():
            continue
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay did: rows made pending again, and matching rows left alone because a
    worker holds their lease right now (resetting them would let another instance send them
    while the first one's request is in flight)."""

    replayed: int
    leased: int


async def replay(
    pool: asyncpg.Pool,
    *,
    enterprise_number: str,
    event_id: int | None = None,
    idempotency_key: str | None = None,
    call_unique_id: str | None = None,
    since: datetime | None = None,
    states: Sequence[str] = ("dead", "expired", "superseded"),
    popup_ttl: float = OutboxConfig().popup_ttl,
) -> ReplayResult:
    """Make events pending again (one, one call's history, or the failed ones since a time).

    Popups come back as history when they belonged to a hangup (their moment has passed);
    history is safe to re-send because RetailCRM dedups uploads by ``externalId``. A call is
    replayed as its history only (whatever its rows' states): a popup of a past call is noise.
    A row under a live lease is skipped and counted in ``leased``: the lease test is part of the
    UPDATE, so a claim committed while the replay waits for the row's lock is seen and respected.
    """
    conditions = ["enterprise_number = $1", "kind <> 'note'"]
    args: list[Any] = [enterprise_number]
    if event_id is not None:
        args.append(event_id)
        conditions.append(f"id = ${len(args)}")
    elif idempotency_key is not None:
        args.append(idempotency_key)
        conditions.append(f"idempotency_key = ${len(args)}")
    elif call_unique_id is not None:
        args.append(call_unique_id)
        conditions.append(f"call_unique_id = ${len(args)}")
        conditions.append("state <> 'pending' AND (kind = 'history' OR has_history)")
    else:
        args.append(list(states))
        conditions.append(f"state = ANY(${len(args)}::text[])")
        if since is not None:
            args.append(since)
            conditions.append(f"created_at >= ${len(args)}")
    args.append(popup_ttl)
    ttl = f"${len(args)}"
    counts = await pool.fetchrow(
        f"""WITH target AS (
                SELECT id FROM retailcrm_outbox WHERE {" AND ".join(conditions)}),
            replayed AS (
                UPDATE retailcrm_outbox o
                SET state = 'pending', attempts = 0, due_at = now(), finished_at = NULL,
                    lease_owner = NULL, lease_until = NULL,
                    kind = CASE WHEN o.has_history THEN 'history' ELSE o.kind END,
                    expires_at = CASE WHEN o.kind = 'popup' AND NOT o.has_history
                                      THEN now() + make_interval(secs => {ttl})
                                      ELSE o.expires_at END
                FROM target t
                WHERE o.id = t.id AND (o.lease_until IS NULL OR o.lease_until < now())
                RETURNING o.id)
            SELECT (SELECT count(*) FROM target) AS matched,
                   (SELECT count(*) FROM replayed) AS replayed""",  # noqa: S608 (fixed strings)
        *args,
    )
    assert counts is not None
    return ReplayResult(replayed=counts["replayed"], leased=counts["matched"] - counts["replayed"])
