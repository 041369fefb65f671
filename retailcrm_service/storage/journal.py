"""The ``integration_logs`` writer: non-blocking, batched, secrets masked, payloads truncated.

``IntegrationLogWriter`` is an async context manager owned by the app lifespan (``runtime.logs``)::

    runtime.logs.write("0367", "call_event", request_data={...}, response_data={...},
                       status="success", error_message=None, call_unique_id="1757840723.6")

``write`` is synchronous and O(1): it masks and truncates the payloads, then puts the row on a
bounded queue; a background task inserts rows in batches (waiting up to ``linger`` seconds for a
batch to fill). When the queue is full the row is dropped
and counted (``stats()["dropped"]``): the journal must never slow down call handling. Closing the
writer flushes what is queued (under a deadline). ``await writer.flush()`` waits until every row
written so far is stored (tests, shutdown). Rows older than ``retention_days`` (0 = forever) are
deleted periodically, in small batches.

Masking: values of keys that name secrets (api_key, apiKey, X-API-KEY, token, secret, password,
clientId, authorization, jwt, cookie, ...) become ``***`` + at most their last 4 chars; any string
that contains a value passed in ``redact=`` is scrubbed too; ``token=`` / ``apiKey=`` query
parameters inside URLs are masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncpg

from retailcrm_service.security.secrets import Secret, mask
from retailcrm_service.storage.database import DATABASE_ERRORS
from vochi_crm_client import BackgroundTasks, log_unexpected

logger = logging.getLogger(__name__)

_SECRET_KEY = re.compile(
    r"(api[_-]?key|x-api-key|token|secret|password|passwd|client[_-]?id|authorization|jwt|cookie"
    r"|private[_-]?key|dsn)",
    re.IGNORECASE,
)
_SECRET_IN_URL = re.compile(r"((?:token|apikey|api_key|clientid|jwt)=)([^&#\s\"']+)", re.IGNORECASE)
MAX_PAYLOAD_CHARS = 16_384


@dataclass(frozen=True, slots=True)
class LogRow:
    enterprise_number: str
    integration_type: str
    event_type: str
    request_data: str | None
    response_data: str | None
    status: str
    error_message: str | None
    call_unique_id: str | None


def mask_payload(value: Any, *, redact: Iterable[str] = ()) -> Any:
    """A copy of ``value`` with secrets masked (see module docstring)."""
    needles = tuple(s for s in redact if s and len(s) >= 4)
    return _mask(value, needles, under_secret_key=False)


def _mask(value: Any, needles: tuple[str, ...], *, under_secret_key: bool) -> Any:
    if isinstance(value, Secret):
        return value.masked
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key, secret = _key(k)
            out[key] = _mask(v, needles, under_secret_key=secret)
        return out
    if isinstance(value, (list, tuple)):
        return [_mask(v, needles, under_secret_key=under_secret_key) for v in value]
    if isinstance(value, str):
        if under_secret_key:
            return _storable(mask(value))
        return _storable(_scrub(value, needles))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # json.dumps would write NaN/Infinity, which jsonb refuses
    if under_secret_key and value is not None and not isinstance(value, bool):
        return "***"
    return value


# Payload keys repeat from row to row ("phone", "codes", ...): what each one becomes, and
# whether it names a secret, is remembered (up to a bound: keys of hostile payloads are not).
_KEYS: dict[Any, tuple[str, bool]] = {}
_KEYS_MAX = 4096


def _key(k: Any) -> tuple[str, bool]:
    known = _KEYS.get(k) if type(k) is str else None
    if known is not None:
        return known
    text = str(k)
    known = (_storable(text), bool(_SECRET_KEY.search(text)))
    if type(k) is str and len(_KEYS) < _KEYS_MAX:
        _KEYS[k] = known
    return known


def _storable(text: str) -> str:
    """``text`` without what PostgreSQL refuses (NUL, lone surrogates): one hostile string must
    not fail the insert of a whole batch of other enterprises' rows."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _scrub(text: str, needles: tuple[str, ...]) -> str:
    for needle in needles:
        if needle in text:
            text = text.replace(needle, mask(needle))
    if "=" not in text:  # every _SECRET_IN_URL match has one
        return text
    return _SECRET_IN_URL.sub(lambda m: m.group(1) + "***", text)


def encode_payload(
    value: Any, *, limit: int = MAX_PAYLOAD_CHARS, redact: Iterable[str] = ()
) -> str | None:
    """Masked JSON text of ``value``, replaced by a truncated preview when over ``limit`` chars."""
    if value is None:
        return None
    text = json.dumps(mask_payload(value, redact=redact), ensure_ascii=False, default=str)
    if len(text) <= limit:
        return text
    return json.dumps(
        {"_truncated": True, "_original_chars": len(text), "preview": text[: max(0, limit - 200)]},
        ensure_ascii=False,
    )


Sink = Callable[[Sequence[LogRow]], Awaitable[None]]


def pg_sink(pool: asyncpg.Pool) -> Sink:
    """Insert rows into ``integration_logs`` through ``pool``."""

    async def insert(rows: Sequence[LogRow]) -> None:
        await pool.executemany(
            """INSERT INTO integration_logs (enterprise_number, integration_type, event_type,
                   request_data, response_data, status, error_message, call_unique_id)
               VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8)""",
            [
                (
                    r.enterprise_number,
                    r.integration_type,
                    r.event_type,
                    r.request_data,
                    r.response_data,
                    r.status,
                    r.error_message,
                    r.call_unique_id,
                )
                for r in rows
            ],
        )

    return insert


class IntegrationLogWriter:
    """Owns the journal's queue and its flushing task (see module docstring)."""

    def __init__(
        self,
        *,
        sink: Sink,
        integration_type: str = "retailcrm",
        batch_size: int = 200,
        linger: float = 0.0,
        max_queue: int = 10_000,
        max_payload_chars: int = MAX_PAYLOAD_CHARS,
        retention_days: int = 30,
        purge: Callable[[int], Awaitable[int]] | None = None,
        purge_interval: float = 3600.0,
        close_timeout: float = 5.0,
        retry_delay: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be >= 1")
        if not 0 <= linger <= 10:
            raise ValueError("linger must be within 0..10 seconds")
        self._sink = sink
        self._type = integration_type
        self._batch_size = batch_size
        self._linger = linger
        self._max_payload = max_payload_chars
        self._retention_days = retention_days
        self._purge = purge
        self._purge_interval = purge_interval
        self._close_timeout = close_timeout
        self._retry_delay = retry_delay
        self._sleep = sleep
        self._clock = clock
        self._queue: asyncio.Queue[LogRow] = asyncio.Queue(maxsize=max_queue)
        self._tasks = BackgroundTasks("integration-log", logger=logger)
        self._stopping = asyncio.Event()
        self._written = 0
        self._stored = 0
        self._dropped = 0
        self._failed_batches = 0
        self._purged = 0
        self._lost_rows = 0
        self._stored_cond = asyncio.Condition()

    # -- producer side ------------------------------------------------------------------------

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
        redact: Iterable[str | Secret] = (),
    ) -> bool:
        """Queue one journal row; never blocks, never raises for I/O. False when dropped."""
        needles = [s.get_secret_value() if isinstance(s, Secret) else s for s in redact]
        row = LogRow(
            enterprise_number=enterprise_number,
            integration_type=self._type,
            event_type=event_type,
            request_data=encode_payload(request_data, limit=self._max_payload, redact=needles),
            response_data=encode_payload(response_data, limit=self._max_payload, redact=needles),
            status="success" if status == "success" else "error",
            error_message=None
            if error_message is None
            else _storable(_scrub(error_message, tuple(n for n in needles if n))[:2000]),
            call_unique_id=call_unique_id,
        )
        if self._stopping.is_set():
            self._dropped += 1
            return False
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self._dropped += 1
            logger.warning("integration_log.dropped reason=queue_full event_type=%s", event_type)
            return False
        self._written += 1
        return True

    async def flush(self) -> None:
        """Wait until every row written so far is stored (or counted as failed)."""
        target = self._written
        async with self._stored_cond:
            await self._stored_cond.wait_for(lambda: self._stored + self._lost_rows >= target)

    def stats(self) -> dict[str, Any]:
        return {
            "written": self._written,
            "stored": self._stored,
            "dropped": self._dropped,
            "failed_batches": self._failed_batches,
            "lost": self._lost_rows,
            "queued": self._queue.qsize(),
            "purged": self._purged,
            "retention_days": self._retention_days,
        }

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> IntegrationLogWriter:
        self._tasks.open()
        self._tasks.start(self._drain_loop, name="integration-log-writer")
        if self._purge is not None and self._retention_days > 0:
            self._tasks.start(self._purge_loop, name="integration-log-retention")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        # Flush what is queued within the deadline; then cancel whatever still runs.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._close_timeout):
                await self.flush()
        await self._tasks.close()

    async def _drain_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if self._linger and not self._stopping.is_set():
                # Let the batch fill: one INSERT per request was, under steady load, a quarter
                # of the service's statements. Closing the writer cuts the wait short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        await self._stopping.wait()
            batch = [first]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._store(batch)

    async def _store(self, batch: list[LogRow]) -> None:
        for attempt in range(3):
            try:
                await self._sink(batch)
            except Exception as exc:  # the journal must outlive any failure of its sink
                if isinstance(exc, DATABASE_ERRORS):
                    logger.warning(
                        "integration_log.insert_failed rows=%d attempt=%d error=%s",
                        len(batch),
                        attempt + 1,
                        type(exc).__name__,
                    )
                else:
                    log_unexpected(logger, "integration_log.insert_failed", exc, rows=len(batch))
                self._failed_batches += 1
                if self._stopping.is_set():
                    break
                await self._sleep(self._retry_delay * (attempt + 1))
            else:
                await self._count(stored=len(batch))
                return
        await self._count(lost=len(batch))

    async def _count(self, *, stored: int = 0, lost: int = 0) -> None:
        async with self._stored_cond:
            self._stored += stored
            self._lost_rows += lost
            self._stored_cond.notify_all()

    async def _purge_loop(self) -> None:
        assert self._purge is not None
        while True:
            try:
                self._purged += await self._purge(self._retention_days)
            except Exception as exc:  # retried at the next interval
                if isinstance(exc, DATABASE_ERRORS):
                    logger.warning("integration_log.purge_failed error=%s", type(exc).__name__)
                else:
                    log_unexpected(logger, "integration_log.purge_failed", exc)
            await self._sleep(self._purge_interval)


def pg_purge(
    pool: asyncpg.Pool, *, integration_type: str = "retailcrm", batch: int = 5000
) -> Callable[[int], Awaitable[int]]:
    """Delete this integration's journal rows older than N days, in batches; returns the count."""

    async def purge(days: int) -> int:
        total = 0
        while True:
            status = await pool.execute(
                """DELETE FROM integration_logs WHERE id IN (
                       SELECT id FROM integration_logs
                       WHERE integration_type = $1
                         AND created_at < now() - make_interval(days => $2)
                       LIMIT $3)""",
                integration_type,
                days,
                batch,
            )
            deleted = int(status.rsplit(" ", 1)[-1])
            total += deleted
            if deleted < batch:
                return total

    return purge
