"""``CallEvent``: one validated call event, and the idempotency key the whole system shares.

The event is validated and serialised once, when it is built: a bad event fails in the caller's
hands with a clear ``ValueError`` instead of poisoning a batch later, and the bytes that go on the
wire cannot change if the caller mutates its payload afterwards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal

__all__ = ["EVENT_TYPES", "ORIGINS", "CallEvent", "EventType", "Origin", "idempotency_key"]

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


def _parse_occurred_at(value: datetime | str | None) -> datetime | None:
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
        if not isinstance(self.enterprise_number, str) or not _ENTERPRISE_RE.fullmatch(
            self.enterprise_number
        ):
            raise ValueError(f"enterprise_number is invalid: {self.enterprise_number!r}")
        # isinstance first: a list or dict is unhashable, and must be a ValueError like any other.
        if not isinstance(self.event_type, str) or self.event_type not in EVENT_TYPES:
            raise ValueError(
                f"event_type must be one of {sorted(EVENT_TYPES)}, not {self.event_type!r}"
            )
        if not isinstance(self.payload, Mapping) or not all(
            isinstance(k, str) for k in self.payload
        ):
            raise ValueError("payload must be a mapping with string keys")
        payload = MappingProxyType(dict(self.payload))
        object.__setattr__(self, "payload", payload)
        uid = self.call_unique_id or payload.get("UniqueId", "")
        if not isinstance(uid, str) or not _UNIQUE_ID_RE.fullmatch(uid):
            raise ValueError(f"call_unique_id (or payload.UniqueId) is invalid: {uid!r}")
        object.__setattr__(self, "call_unique_id", uid)
        object.__setattr__(self, "occurred_at", _parse_occurred_at(self.occurred_at))
        object.__setattr__(self, "origin", self._checked_origin())
        exts = _extensions_of(payload) if self.event_type == "dial" else []
        key = idempotency_key(self.enterprise_number, uid, self.event_type, exts)
        object.__setattr__(self, "idempotency_key", key)
        object.__setattr__(self, "is_popup", self.event_type in POPUP_TYPES)
        object.__setattr__(self, "wire", self._encode())

    def _checked_origin(self) -> Origin:
        origin = self.origin
        if origin is None:
            return "download" if self.event_type == "download" else "live"
        if not isinstance(origin, str) or origin not in ORIGINS:
            raise ValueError(f"origin must be 'live' or 'download', not {origin!r}")
        if origin == "download" and self.event_type in POPUP_TYPES:
            raise ValueError("only hangups can be recovered (origin='download')")
        if origin == "live" and self.event_type == "download":
            raise ValueError("a download event cannot have origin='live'")
        return origin

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
