"""``CallEvent``: one validated call event, and the rules and key the whole system shares.

The event is validated and serialised once, when it is built: a bad event fails in the caller's
hands with a clear ``ValueError`` instead of poisoning a batch later, and the bytes that go on the
wire cannot change if the caller mutates its payload afterwards.

``validate_event`` is the validation alone (no copy, no serialisation): ``CallEvent`` uses it, and
so does the service's intake, so that a call service and the service accept exactly the same
events and derive the same idempotency key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal

__all__ = [
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "ORIGINS",
    "CallEvent",
    "EventFields",
    "EventType",
    "Origin",
    "idempotency_key",
    "validate_event",
]

EventType = Literal["dial", "bridge", "hangup", "download"]
Origin = Literal["live", "download"]

EVENT_TYPES: Final = frozenset({"dial", "bridge", "hangup", "download"})
ORIGINS: Final = frozenset({"live", "download"})
POPUP_TYPES: Final = frozenset({"dial", "bridge"})

# One event must fit comfortably in the service's 1 MiB request limit next to 99 others.
MAX_EVENT_BYTES: Final = 64 * 1024

_ENTERPRISE_RE: Final = re.compile(r"[0-9A-Za-z_.\-]{1,32}")
_UNIQUE_ID_RE: Final = re.compile(r"[^\s]{1,128}")
_KEY_ESCAPES: Final = str.maketrans({"%": "%25", ":": "%3A", ",": "%2C"})


def idempotency_key(
    enterprise_number: str,
    call_unique_id: str,
    event_type: str,
    extensions: Iterable[str] = (),
) -> str:
    """The idempotency key of one event; the service uses this function too.

    Why keys look like this: docs/architecture.md#decisions-and-their-reasons.

    - dial: ``(enterprise, UniqueId, "dial", sorted non-empty extensions)``, so a later dial of the
      same call with new extensions (ring-group escalation, follow-me) gets a new key and still
      reaches the CRM, while a repeat of the same dial is a duplicate;
    - every other type: ``(enterprise, UniqueId, event_type)``, except that ``download`` counts as
      ``hangup``: a recovered hangup is the same fact as the live one it replaces, so whichever
      arrives second is a duplicate.

    The parts are joined with ``:`` (extensions with ``,``) after percent-escaping ``%``, ``:`` and
    ``,`` inside each part, so the key is readable (``0367:1757840723.6:dial:150,151``) and no two
    different tuples share a key.
    """
    kind = "hangup" if event_type == "download" else event_type
    parts = [p.translate(_KEY_ESCAPES) for p in (enterprise_number, call_unique_id, kind)]
    if kind == "dial":
        exts = sorted({e.strip() for e in extensions if e.strip()})
        parts.append(",".join(e.translate(_KEY_ESCAPES) for e in exts))
    return ":".join(parts)


def _extensions_of(payload: Mapping[str, Any]) -> list[str]:
    raw = payload.get("Extensions")
    if raw is None:
        return []
    if isinstance(raw, str | int):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise ValueError("payload.Extensions must be a list of strings")
    out = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ValueError("payload.Extensions must be a list of strings")
        out.append(str(item))
    return out


def _parse_occurred_at(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"occurred_at is not ISO-8601: {value!r}") from exc
    if not isinstance(value, datetime):
        raise ValueError("occurred_at must be a datetime or an ISO-8601 string")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("occurred_at must be timezone-aware")
    return value


@dataclass(frozen=True, slots=True)
class EventFields:
    """What ``validate_event`` derived from one event's fields."""

    call_unique_id: str
    origin: Origin
    occurred_at: datetime | None
    idempotency_key: str


def validate_event(
    *,
    enterprise_number: Any,
    event_type: Any,
    call_unique_id: Any = "",
    payload: Any,
    occurred_at: Any = None,
    origin: Any = None,
) -> EventFields:
    """Check one event's fields (the service contract, README.md's routes); ``ValueError`` says
    what is wrong.

    ``call_unique_id`` defaults to ``payload["UniqueId"]``; ``origin`` to ``"download"`` for
    ``event_type="download"`` and ``"live"`` otherwise; ``occurred_at`` is a timezone-aware
    datetime or ISO-8601 string. The payload is read, never copied or serialised.
    """
    if not isinstance(enterprise_number, str) or not _ENTERPRISE_RE.fullmatch(enterprise_number):
        raise ValueError(f"enterprise_number is invalid: {enterprise_number!r}")
    # isinstance first: a list or dict is unhashable, and must be a ValueError like any other.
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise ValueError(f"event_type must be one of {sorted(EVENT_TYPES)}, not {event_type!r}")
    if not isinstance(payload, Mapping) or not all(isinstance(k, str) for k in payload):
        raise ValueError("payload must be a mapping with string keys")
    uid = call_unique_id or payload.get("UniqueId", "")
    if not isinstance(uid, str) or not _UNIQUE_ID_RE.fullmatch(uid):
        raise ValueError(f"call_unique_id (or payload.UniqueId) is invalid: {uid!r}")
    when = _parse_occurred_at(occurred_at)
    checked_origin = _checked_origin(event_type, origin)
    exts = _extensions_of(payload) if event_type == "dial" else []
    key = idempotency_key(enterprise_number, uid, event_type, exts)
    return EventFields(uid, checked_origin, when, key)


def _checked_origin(event_type: str, origin: Any) -> Origin:
    if origin is None:
        return "download" if event_type == "download" else "live"
    if not isinstance(origin, str) or origin not in ORIGINS:
        raise ValueError(f"origin must be 'live' or 'download', not {origin!r}")
    if origin == "download" and event_type in POPUP_TYPES:
        raise ValueError("only hangups can be recovered (origin='download')")
    if origin == "live" and event_type == "download":
        raise ValueError("a download event cannot have origin='live'")
    return "download" if origin == "download" else "live"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class CallEvent:
    """One call event for the CRMs: validated, immutable, serialised once.

    ``call_unique_id`` defaults to ``payload["UniqueId"]``; ``origin`` defaults to ``"download"``
    for ``event_type="download"`` and ``"live"`` otherwise. Only hangups can be recovered ones.
    Invalid input raises ``ValueError``.
    """

    enterprise_number: str
    event_type: EventType
    call_unique_id: str = ""
    payload: Mapping[str, Any] = field(default_factory=dict)
    occurred_at: datetime | None = None
    origin: Origin | None = None
    idempotency_key: str = field(init=False)
    # A live dial or bridge: worthless once stale, superseded by the call's hangup. A plain
    # attribute, not a property: the dispatcher reads it on the hot path.
    is_popup: bool = field(init=False, repr=False)
    wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = validate_event(
            enterprise_number=self.enterprise_number,
            event_type=self.event_type,
            call_unique_id=self.call_unique_id,
            payload=self.payload,
            occurred_at=self.occurred_at,
            origin=self.origin,
        )
        object.__setattr__(self, "payload", MappingProxyType(dict(self.payload)))
        object.__setattr__(self, "call_unique_id", fields.call_unique_id)
        object.__setattr__(self, "occurred_at", fields.occurred_at)
        object.__setattr__(self, "origin", fields.origin)
        object.__setattr__(self, "idempotency_key", fields.idempotency_key)
        object.__setattr__(self, "is_popup", self.event_type in POPUP_TYPES)
        object.__setattr__(self, "wire", self._encode())

    def _encode(self) -> bytes:
        try:
            data = json.dumps(
                self.to_json(), ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"payload is not JSON-serialisable: {exc}") from exc
        if len(data) > MAX_EVENT_BYTES:
            raise ValueError(f"event is {len(data)} bytes, more than {MAX_EVENT_BYTES}")
        return data

    def to_json(self) -> dict[str, Any]:
        """The event as the service contract (README.md's routes) spells it."""
        out: dict[str, Any] = {
            "enterprise_number": self.enterprise_number,
            "event_type": self.event_type,
            "call_unique_id": self.call_unique_id,
            "payload": dict(self.payload),
            "origin": self.origin,
            "idempotency_key": self.idempotency_key,
        }
        if self.occurred_at is not None:
            out["occurred_at"] = self.occurred_at.isoformat()
        return out
