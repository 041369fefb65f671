"""Intake of ``POST /api/events`` bodies, and the event pipeline component of the service.

``parse_events(body)`` turns a decoded JSON body (one event, or ``{"events": [...]}``) into
per-event results: a ``StoredEvent`` or an error message. Validation follows the library's
``CallEvent`` rules and uses its idempotency-key function (one algorithm for the whole system);
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
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

import asyncpg
import httpx
from prometheus_client import CollectorRegistry

from retailcrm_service.crm.pacing import Pacer
from retailcrm_service.pipeline.delivery import (
    ConfigSource,
    DeliveryConfig,
    DeliveryService,
    LogSink,
)
from retailcrm_service.pipeline.outbox import GroupCommitter, OutboxConfig, StoredEvent, replay
from vochi_crm_client._event import EVENT_TYPES, MAX_EVENT_BYTES, ORIGINS, idempotency_key

logger = logging.getLogger(__name__)

MAX_EVENTS = 1000
MAX_BODY_BYTES = 1024 * 1024


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


# The rules of the library's ``CallEvent`` (tests pin that both accept the same events and derive
# the same key), without building the client-side object: the intake is the service's hot path
# and ``CallEvent`` also serialises the event for the wire, which the service never needs.
_ENTERPRISE_RE = re.compile(r"[0-9A-Za-z_.\-]{1,32}")
_UNIQUE_ID_RE = re.compile(r"[^\s]{1,128}")
_POPUP_TYPES = frozenset({"dial", "bridge"})


def validated(item: dict[str, Any]) -> StoredEvent:
    """One contract event as stored; ``ValueError`` says what is wrong with it."""
    enterprise = item.get("enterprise_number")
    if not isinstance(enterprise, str) or not _ENTERPRISE_RE.fullmatch(enterprise):
        raise ValueError(f"enterprise_number is invalid: {enterprise!r}")
    event_type = item.get("event_type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise ValueError(f"event_type must be one of {sorted(EVENT_TYPES)}, not {event_type!r}")
    payload = item.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ValueError("payload must be an object")
    uid = item.get("call_unique_id") or payload.get("UniqueId", "")
    if not isinstance(uid, str) or not _UNIQUE_ID_RE.fullmatch(uid):
        raise ValueError(f"call_unique_id (or payload.UniqueId) is invalid: {uid!r}")
    origin = _origin(event_type, item.get("origin"))
    occurred_at = _occurred_at(item.get("occurred_at"))
    extensions = _extensions(payload) if event_type == "dial" else []
    _check_storable(uid, "call_unique_id")
    return StoredEvent(
        enterprise_number=enterprise,
        event_type=event_type,
        call_unique_id=uid,
        payload=payload,
        origin=origin,
        idempotency_key=idempotency_key(enterprise, uid, event_type, extensions),
        occurred_at=occurred_at,
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


def _origin(event_type: str, origin: Any) -> str:
    if origin is None:
        return "download" if event_type == "download" else "live"
    if not isinstance(origin, str) or origin not in ORIGINS:
        raise ValueError(f"origin must be 'live' or 'download', not {origin!r}")
    if origin == "download" and event_type in _POPUP_TYPES:
        raise ValueError("only hangups can be recovered (origin='download')")
    if origin == "live" and event_type == "download":
        raise ValueError("a download event cannot have origin='live'")
    return str(origin)


def _occurred_at(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("occurred_at must be an ISO-8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"occurred_at is not ISO-8601: {value!r}") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError("occurred_at must be timezone-aware")
    return parsed


def _extensions(payload: dict[str, Any]) -> list[str]:
    raw = payload.get("Extensions")
    if raw is None:
        return []
    if isinstance(raw, str | int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or any(
        isinstance(e, bool) or not isinstance(e, str | int) for e in raw
    ):
        raise ValueError("payload.Extensions must be a list of strings")
    return [str(e) for e in raw]


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
        logs: LogSink | None = None,
        http: httpx.AsyncClient | None = None,
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
                pool=pool,
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

    async def replay(self, **selection: Any) -> int:
        """Make settled rows due again (``outbox.replay``'s selection) and wake delivery."""
        count = await replay(self.pool, popup_ttl=self.outbox_config.popup_ttl, **selection)
        if self.delivery is not None:
            self.delivery.wake()
        return count

    async def health(self) -> dict[str, Any]:
        """Backlog and oldest due event (from the database)."""
        if self.delivery is None:
            return {}
        return await self.delivery.health()
