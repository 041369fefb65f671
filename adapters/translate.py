"""Host webhook payloads -> ``CallEvent``, with every host quirk handled (docs/asterisk.md#quirks).

The payload sent on is the host's, normalised so that no consumer has to know the quirks:

- ``Token`` is removed (it is a credential; the enterprise is resolved from it before);
- ``CallType`` is an int (hosts send ``0`` or ``"0"``); ``CallStatus`` a string;
- ``Extensions`` holds the non-empty extensions only (hosts send ``[""]`` when they lost them);
- ``Phone`` ``"<unknown>"`` becomes ``""`` (unknown);
- the line is always ``Trunk`` (hosts also send ``TrunkId``, ``INCALL`` or ``Incall``);
- an empty ``StartTime`` falls back to ``DateReceived``;
- ``origin`` leaves the payload: a recovered hangup (``POST /hangup`` with ``origin: "download"``,
  or ``POST /download``) becomes ``event_type="hangup"``, ``origin="download"``.

Skipped, unless configured otherwise: ``start`` (not a CRM event), internal calls
(``CallType`` 2) and the internal legs of calls the CRM itself originated
(``ExternalInitiated: true``). ``Translator`` also remembers skipped calls for a while so that
their bridges (which carry no ``CallType``) are skipped too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from vochi_crm_client._event import CallEvent

__all__ = ["HOST_EVENTS", "Skipped", "Translator", "normalise_payload", "translate"]

HOST_EVENTS: Final = frozenset({"start", "dial", "bridge", "hangup", "download"})
TRUNK_ALIASES: Final = ("Trunk", "TrunkId", "INCALL", "Incall")
UNKNOWN_PHONE: Final = "<unknown>"
CALL_TYPE_INTERNAL: Final = 2
# The event type a live host event becomes (a recovered one is always a hangup).
_LIVE_EVENT_TYPES: Final[Mapping[str, Literal["dial", "bridge", "hangup"]]] = {
    "dial": "dial",
    "bridge": "bridge",
    "hangup": "hangup",
}


@dataclass(frozen=True, slots=True)
class Skipped:
    """A host event that is deliberately not sent to the CRMs, and why."""

    reason: str  # "start" | "internal" | "crm_originated"


def _call_type(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("CallType must be 0, 1 or 2")
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value not in (0, 1, 2):
        raise ValueError(f"CallType must be 0, 1 or 2, not {value!r}")
    return value


def _extensions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("Extensions must be a list of strings")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ValueError("Extensions must be a list of strings")
        text = str(item).strip()
        if text:
            out.append(text)
    return out


def normalise_payload(body: Mapping[str, Any]) -> dict[str, Any]:
    """The host fields with the quirks of the module docstring ironed out."""
    payload = {k: v for k, v in body.items() if k not in ("Token", "origin", *TRUNK_ALIASES)}
    call_type = _call_type(body.get("CallType"))
    if call_type is not None:
        payload["CallType"] = call_type
    if "Extensions" in body:
        payload["Extensions"] = _extensions(body["Extensions"])
    if body.get("Phone") == UNKNOWN_PHONE:
        payload["Phone"] = ""
    trunk = next((body[k] for k in TRUNK_ALIASES if body.get(k) not in (None, "")), None)
    if trunk is not None:
        payload["Trunk"] = str(trunk)
    if "StartTime" in body and not body.get("StartTime") and body.get("DateReceived"):
        payload["StartTime"] = body["DateReceived"]
    if "CallStatus" in body and isinstance(body["CallStatus"], int):
        payload["CallStatus"] = str(body["CallStatus"])
    return payload


def _unique_id(body: Mapping[str, Any]) -> str:
    uid = body.get("UniqueId")
    if isinstance(uid, int | float) and not isinstance(uid, bool):
        uid = str(uid)
    if not isinstance(uid, str) or not uid.strip():
        raise ValueError("UniqueId is required")
    return uid.strip()


def translate(
    host_event: str,
    body: Mapping[str, Any],
    *,
    enterprise_number: str,
    received_at: datetime | None = None,
    forward_internal: bool = False,
    forward_crm_originated: bool = False,
) -> CallEvent | Skipped:
    """One host webhook -> the ``CallEvent`` to emit, or ``Skipped``. Raises ``ValueError``.

    ``received_at`` (timezone-aware) becomes ``occurred_at`` of live events; recovered hangups
    have none (they happened long before).
    """
    if host_event not in HOST_EVENTS:
        raise ValueError(f"unknown host event {host_event!r}")
    if not isinstance(body, Mapping):
        raise ValueError("the body must be a JSON object")
    if host_event == "start":
        _unique_id(body)
        return Skipped("start")
    payload = normalise_payload(body)
    if payload.get("CallType") == CALL_TYPE_INTERNAL:
        if body.get("ExternalInitiated") is True:
            if not forward_crm_originated:
                return Skipped("crm_originated")
        elif not forward_internal:
            return Skipped("internal")
    recovered = host_event == "download" or body.get("origin") == "download"
    if recovered and host_event in ("dial", "bridge"):
        raise ValueError("only hangups can be recovered (origin='download')")
    return CallEvent(
        enterprise_number=enterprise_number,
        event_type="hangup" if recovered else _LIVE_EVENT_TYPES[host_event],
        call_unique_id=_unique_id(body),
        payload=payload,
        occurred_at=None if recovered else received_at,
        origin="download" if recovered else "live",
    )


class Translator:
    """``translate`` with options, remembering skipped calls so their bridges are skipped too."""

    def __init__(
        self,
        *,
        forward_internal: bool = False,
        forward_crm_originated: bool = False,
        remember: int = 10_000,
    ) -> None:
        if remember < 0:
            raise ValueError("remember must be >= 0")
        self.forward_internal = forward_internal
        self.forward_crm_originated = forward_crm_originated
        self._remember = remember
        self._skipped: OrderedDict[tuple[str, str], str] = OrderedDict()

    def __call__(
        self,
        host_event: str,
        body: Mapping[str, Any],
        *,
        enterprise_number: str,
        received_at: datetime | None = None,
    ) -> CallEvent | Skipped:
        if host_event == "bridge" and isinstance(body, Mapping):
            reason = self._skipped.get((enterprise_number, str(body.get("UniqueId", ""))))
            if reason is not None:
                return Skipped(reason)
        result = translate(
            host_event,
            body,
            enterprise_number=enterprise_number,
            received_at=received_at,
            forward_internal=self.forward_internal,
            forward_crm_originated=self.forward_crm_originated,
        )
        if isinstance(result, Skipped) and result.reason != "start" and self._remember:
            key = (enterprise_number, _unique_id(body))
            self._skipped[key] = result.reason
            self._skipped.move_to_end(key)
            while len(self._skipped) > self._remember:
                self._skipped.popitem(last=False)
        return result
