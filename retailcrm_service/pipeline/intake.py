"""Intake of ``POST /api/events`` bodies, and the event pipeline component of the service.

``parse_events(body)`` turns a decoded JSON body (one event, or ``{"events": [...]}``) into
per-event results: a ``StoredEvent`` or an error message. Validation is the library's
(``validate_event``, the rules of ``CallEvent`` and its idempotency key: one for the system);
a bad event, including one PostgreSQL could not store, is rejected alone and never sinks the
others.

``EventPipeline`` is what the app lifespan owns: the group committer (intake) and the delivery
workers, with ``stats()`` for ``/stats``/``/metrics`` and ``health()`` for ``/health``. Routes
reach it as ``request.app.state.event_pipeline``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

import asyncpg
from prometheus_client import CollectorRegistry

from retailcrm_service.crm.client import CrmHttpClient
from retailcrm_service.crm.pacing import Pacer
from retailcrm_service.pipeline.delivery import (
    ConfigSource,
    DeliveryConfig,
    DeliveryService,
    LogSink,
)
from retailcrm_service.pipeline.outbox import (
    GroupCommitter,
    OutboxConfig,
    ReplayResult,
    StoredEvent,
    replay,
)
from vochi_crm_client import MAX_EVENT_BYTES, validate_event

logger = logging.getLogger(__name__)

MAX_EVENTS = 1000
MAX_BODY_BYTES = 1024 * 1024
# PostgreSQL refuses a UTC offset of 16 hours or more ("time zone displacement out of range");
# Python accepts up to 24. Real offsets stay within -12:00..+14:00.
MAX_UTC_OFFSET = timedelta(hours=16)
# The idempotency key is indexed together with the enterprise number; a btree entry holds at most
# 2704 bytes, and a longer key fails the whole INSERT it is part of. A dial's key grows with its
# Extensions; a real one is a few dozen bytes.
MAX_KEY_BYTES = 1024


class BodyTooLarge(ValueError):
    """More events than one request may carry."""


class BodyInvalid(ValueError):
    """The body is JSON but neither an event nor ``{"events": [...]}``."""


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    error: str


def parse_events(body: Any) -> list[StoredEvent | Rejected]:
    """Per event of the body, the event to store or why it was rejected."""
    if isinstance(body, dict) and "events" in body:
        items = body["events"]
        if not isinstance(items, list):
            raise BodyInvalid('"events" must be a list')
        if len(items) > MAX_EVENTS:
            raise BodyTooLarge(f"at most {MAX_EVENTS} events per request, got {len(items)}")
    elif isinstance(body, dict):
        items = [body]
    else:
        raise BodyInvalid('the body must be an event object or {"events": [...]}')
    return [_parse_one(index, item) for index, item in enumerate(items)]


def _parse_one(index: int, item: Any) -> StoredEvent | Rejected:
    if not isinstance(item, dict):
        return Rejected(index, "an event must be an object")
    missing = [name for name in ("enterprise_number", "event_type") if name not in item]
    if missing:
        return Rejected(index, f"missing field(s): {', '.join(missing)}")
    try:
        return validated(item)
    except ValueError as exc:
        return Rejected(index, _short(str(exc)))


def validated(item: dict[str, Any]) -> StoredEvent:
    """One contract event as stored; ``ValueError`` says what is wrong with it.

    The event rules and the idempotency key are the library's (``validate_event``, which
    ``CallEvent`` uses too), without building a ``CallEvent``: that also serialises the event for
    the wire, which the service, on its hot path, never needs. What is added here is what
    PostgreSQL could not store.
    """
    payload = item.get("payload")
    if payload is None:
        payload = {}
    fields = validate_event(
        enterprise_number=item.get("enterprise_number"),
        event_type=item.get("event_type"),
        call_unique_id=item.get("call_unique_id"),
        payload=payload,
        occurred_at=item.get("occurred_at"),
        origin=item.get("origin"),
    )
    _check_storable(fields.call_unique_id, "call_unique_id")
    _check_storable(fields.idempotency_key, "payload.Extensions")
    if len(fields.idempotency_key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(
            f"payload.Extensions are too many or too long: the event's key would be more than "
            f"{MAX_KEY_BYTES} bytes"
        )
    return StoredEvent(
        enterprise_number=item["enterprise_number"],
        event_type=item["event_type"],
        call_unique_id=fields.call_unique_id,
        payload=payload,
        origin=fields.origin,
        idempotency_key=fields.idempotency_key,
        occurred_at=_storable_instant(fields.occurred_at, item.get("occurred_at")),
        payload_json=_payload_json(payload),
    )


def _payload_json(payload: dict[str, Any]) -> str:
    """The payload encoded once, here, so that nothing PostgreSQL would refuse (NaN, NUL,
    lone surrogates, absurd nesting or size) can reach a shared transaction and sink the
    other events committed with it."""
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise ValueError("payload cannot be stored as JSON") from None
    if len(text) > MAX_EVENT_BYTES:
        raise ValueError(f"payload is {len(text)} bytes, more than {MAX_EVENT_BYTES}")
    _check_storable(text, "payload")
    return text


def _check_storable(text: str, name: str) -> None:
    if "\x00" in text or "\\u0000" in text:
        raise ValueError(f"{name} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} contains an invalid (surrogate) character") from None


def _storable_instant(parsed: datetime | None, raw: Any) -> datetime | None:
    """The instant in UTC, or ValueError for what PostgreSQL's timestamptz would refuse."""
    if parsed is None:
        return None
    offset = parsed.utcoffset()
    if offset is not None and abs(offset) >= MAX_UTC_OFFSET:
        raise ValueError(f"occurred_at has an impossible UTC offset: {raw!r}")
    # Stored in UTC: offsets with seconds or fractions, which Python accepts, are not valid
    # PostgreSQL input, and the instant is all the outbox needs.
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise ValueError(f"occurred_at is out of range: {raw!r}") from None


def _short(message: str) -> str:
    return message if len(message) <= 300 else message[:297] + "..."


class Committer(Protocol):
    def submit(self, events: Sequence[StoredEvent]) -> Awaitable[list[bool]]: ...

    def stats(self) -> dict[str, Any]: ...


class NullCommitter:
    """Accepts everything without storing it: the benchmark's non-durable baseline only."""

    def __init__(self) -> None:
        self.committed_events = 0

    async def submit(self, events: Sequence[StoredEvent]) -> list[bool]:
        self.committed_events += len(events)
        return [True] * len(events)

    def stats(self) -> dict[str, Any]:
        return {"committed_events": self.committed_events}


class EventPipeline:
    """Intake and delivery of one service instance, owned by the app lifespan."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        configs: ConfigSource,
        delivery_pool: asyncpg.Pool | None = None,
        logs: LogSink | None = None,
        http: CrmHttpClient | None = None,
        outbox: OutboxConfig | None = None,
        delivery: DeliveryConfig | None = None,
        deliver: bool = True,
        owner: str | None = None,
        registry: CollectorRegistry | None = None,
        pacer: Pacer | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        self.pool = pool
        self.outbox_config = outbox or OutboxConfig()
        self.delivery: DeliveryService | None = (
            DeliveryService(
                # Leases and settles: a commit lost in a crash only repeats a request.
                pool=delivery_pool or pool,
                configs=configs,
                logs=logs,
                http=http,
                config=delivery,
                outbox=self.outbox_config,
                owner=owner,
                registry=registry,
                pacer=pacer,
                listen_dsn=listen_dsn,
            )
            if deliver
            else None
        )
        self.committer: Committer = GroupCommitter(
            pool=pool,
            config=self.outbox_config,
            on_commit=self.delivery.wake if self.delivery is not None else None,
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self.received = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0

    async def __aenter__(self) -> EventPipeline:
        async with contextlib.AsyncExitStack() as stack:
            if self.delivery is not None:
                await stack.enter_async_context(self.delivery)
            assert isinstance(self.committer, GroupCommitter)
            await stack.enter_async_context(self.committer)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.__aexit__(exc_type, exc, tb)
            self._stack = None

    def count(self, accepted: int, duplicates: int, rejected: int) -> None:
        self.received += accepted + duplicates + rejected
        self.accepted += accepted
        self.duplicates += duplicates
        self.rejected += rejected

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable; numeric leaves become gauges in ``/metrics``."""
        out: dict[str, Any] = {
            "intake": {
                "received": self.received,
                "accepted": self.accepted,
                "duplicates": self.duplicates,
                "rejected": self.rejected,
                **self.committer.stats(),
            }
        }
        if self.delivery is not None:
            out.update(self.delivery.stats())
        return out

    async def replay(self, **selection: Any) -> ReplayResult:
        """Make settled rows due again (``outbox.replay``'s selection) and wake delivery."""
        result = await replay(self.pool, popup_ttl=self.outbox_config.popup_ttl, **selection)
        if self.delivery is not None:
            self.delivery.wake()
        return result

    async def health(self) -> dict[str, Any]:
        """Backlog and oldest due event (from the database)."""
        if self.delivery is None:
            return {}
        return await self.delivery.health()
