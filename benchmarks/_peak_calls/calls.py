"""The call mix: the fixture calls as timed webhook scripts, and what each must cause at RetailCRM.

The calls and their payloads are those of ``tests/fixtures/asterisk-calls.jsonl`` (quirks
included): a ring-group escalation, a missed call, an outgoing call, an internal call, a call with
lost extensions and an unknown number, a CRM-originated leg and a recovered hangup. Each call is
paced like a real one: dial at 0, a ring group's next dial 0.5 s later, the bridge 1 s after the
first dial, the hangup 1.5 s after the bridge (2.5 s after the dial, bridged or not).

What a call must produce at RetailCRM (its popups, as ``(type, codes)``, and whether its history
is uploaded) is worked out once per template with the product's own rules
(``adapters.translate`` and ``retailcrm_service.mapping``), so that loss is counted against what
the system is meant to deliver, not against every webhook (internal calls, for example, are
never sent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.translate import Skipped, Translator
from retailcrm_service.crm.mapping import (
    KIND_HISTORY,
    KIND_POPUP,
    MappingConfig,
    history_call,
    kinds_for,
    popup_event,
)

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "asterisk-calls.jsonl"

DIAL_STEP = 0.5
BRIDGE_AT = 1.0
HANGUP_AT = 2.5

USER_EXTENSIONS = {"19": "150", "20": "151", "21": "152"}
"""Every enterprise's RetailCRM users -> extensions (each sandbox account has these users)."""

# label: (words that pick the fixture call, share of the offered calls)
MIX: dict[str, tuple[str, float]] = {
    "escalation": ("ring-group escalation", 0.30),
    "missed": ("missed", 0.20),
    "outgoing": ("outgoing", 0.25),
    "internal": ("internal call", 0.08),
    "unknown": ("unknown number", 0.05),
    "crm_leg": ("click-to-call", 0.04),
    "recovered": ("recovered hangup", 0.08),
}

UID_MARK = b"@UID@"
TOKEN_MARK = b"@TOKEN@"

PopupKey = tuple[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Step:
    """One webhook of a call."""

    at: float
    path: str
    body: bytes  # JSON with UID_MARK and TOKEN_MARK where the call's id and token go
    popup: PopupKey | None  # the telephony/call/event it must cause, if any
    history: bool  # whether it must cause the call's telephony/calls/upload


@dataclass(frozen=True, slots=True)
class Template:
    label: str
    name: str
    share: float
    steps: tuple[Step, ...]

    @property
    def popups(self) -> list[PopupKey]:
        return [s.popup for s in self.steps if s.popup is not None]

    @property
    def has_history(self) -> bool:
        return any(s.history for s in self.steps)


def render(body: bytes, uid: bytes, token: bytes) -> bytes:
    return body.replace(UID_MARK, uid).replace(TOKEN_MARK, token)


def fixture_calls() -> dict[str, list[dict[str, Any]]]:
    """Fixture records grouped by call, in file order."""
    calls: dict[str, list[dict[str, Any]]] = {}
    for line in FIXTURES.read_text("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            calls.setdefault(record["call"], []).append(record)
    return calls


def _timing(records: list[dict[str, Any]]) -> list[float]:
    times, dials = [], 0
    for record in records:
        event = record["event"]
        if event == "dial":
            times.append(dials * DIAL_STEP)
            dials += 1
        elif event == "bridge":
            times.append(BRIDGE_AT)
        elif event == "hangup" and record["body"].get("origin") != "download":
            times.append(HANGUP_AT)
        else:  # start, a recovered hangup
            times.append(0.0)
    return times


def _expectations(records: list[dict[str, Any]]) -> list[tuple[PopupKey | None, bool]]:
    """Per webhook: the popup and the history it must cause (the product's own rules)."""
    translator = Translator()
    mapping = MappingConfig(user_extensions=USER_EXTENSIONS)
    out: list[tuple[PopupKey | None, bool]] = []
    for record in records:
        event = translator(record["event"], record["body"], enterprise_number="0001")
        popup: PopupKey | None = None
        history = False
        if not isinstance(event, Skipped):
            kinds = kinds_for(event.event_type, event.origin or "live")
            if KIND_POPUP in kinds:
                found = popup_event(event.event_type, event.payload, mapping)
                if isinstance(found, dict):
                    popup = (found["type"], tuple(found["codes"]))
            if KIND_HISTORY in kinds:
                history = isinstance(history_call(event.payload, mapping), dict)
        out.append((popup, history))
    return out


def _template_body(body: dict[str, Any]) -> bytes:
    marked = {**body, "UniqueId": "@UID@", "Token": "@TOKEN@"}
    return json.dumps(marked, ensure_ascii=False, separators=(",", ":")).encode()


def templates() -> list[Template]:
    """The mix, one template per fixture call; raises when a fixture call is missing."""
    calls = fixture_calls()
    found = []
    for label, (words, share) in MIX.items():
        name = next((n for n in calls if words in n), None)
        if name is None:
            raise RuntimeError(f"no fixture call matches {words!r} in {FIXTURES}")
        records = calls[name]
        steps = tuple(
            Step(at, "/" + r["event"], _template_body(r["body"]), popup, history)
            for r, at, (popup, history) in zip(
                records, _timing(records), _expectations(records), strict=True
            )
        )
        found.append(Template(label, name, share, tuple(sorted(steps, key=lambda s: s.at))))
    return found
