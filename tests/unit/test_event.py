"""CallEvent: validation at construction, the idempotency key, the wire form."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vochi_crm_client._event import CallEvent, idempotency_key


def _dial(extensions: list[str], uid: str = "1757840723.6") -> CallEvent:
    return CallEvent(
        enterprise_number="0367",
        event_type="dial",
        payload={"UniqueId": uid, "Extensions": extensions, "CallType": 0},
    )


def test_call_unique_id_defaults_to_payload_unique_id() -> None:
    assert _dial(["150"]).call_unique_id == "1757840723.6"


def test_dial_key_uses_sorted_non_empty_extensions() -> None:
    assert _dial(["151", "", "150"]).idempotency_key == "0367:1757840723.6:dial:150,151"
    assert _dial(["150", "151"]).idempotency_key == _dial(["151", "150", "150"]).idempotency_key


def test_later_dial_with_new_extensions_gets_a_new_key() -> None:
    assert _dial(["150", "151"]).idempotency_key != _dial(["150", "151", "152"]).idempotency_key


def test_dial_with_lost_extensions_still_has_a_key() -> None:
    assert _dial([""]).idempotency_key == "0367:1757840723.6:dial:"


def test_other_events_key_on_enterprise_call_and_type() -> None:
    hangup = CallEvent(enterprise_number="0367", event_type="hangup", call_unique_id="1.2")
    bridge = CallEvent(enterprise_number="0367", event_type="bridge", call_unique_id="1.2")
    assert hangup.idempotency_key == "0367:1.2:hangup"
    assert bridge.idempotency_key == "0367:1.2:bridge"


def test_recovered_hangup_shares_the_key_of_the_live_hangup() -> None:
    live = CallEvent(enterprise_number="0367", event_type="hangup", call_unique_id="1.2")
    recovered = CallEvent(
        enterprise_number="0367", event_type="hangup", call_unique_id="1.2", origin="download"
    )
    download = CallEvent(enterprise_number="0367", event_type="download", call_unique_id="1.2")
    assert recovered.idempotency_key == live.idempotency_key == download.idempotency_key
    assert download.origin == "download"
    assert live.origin == "live"


@settings(derandomize=True)
@given(
    a=st.tuples(st.text(max_size=4), st.text(max_size=4), st.lists(st.text(max_size=3))),
    b=st.tuples(st.text(max_size=4), st.text(max_size=4), st.lists(st.text(max_size=3))),
)
def test_distinct_dial_tuples_never_share_a_key(
    a: tuple[str, str, list[str]], b: tuple[str, str, list[str]]
) -> None:
    def norm(t: tuple[str, str, list[str]]) -> tuple[str, str, list[str]]:
        return t[0], t[1], sorted({e.strip() for e in t[2] if e.strip()})

    if norm(a) != norm(b):
        assert idempotency_key(a[0], a[1], "dial", a[2]) != idempotency_key(
            b[0], b[1], "dial", b[2]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enterprise_number": "", "event_type": "dial", "call_unique_id": "1"}, "enterprise"),
        ({"enterprise_number": "03 67", "event_type": "dial", "call_unique_id": "1"}, "enterprise"),
        ({"enterprise_number": "0367", "event_type": "ring", "call_unique_id": "1"}, "event_type"),
        ({"enterprise_number": "0367", "event_type": "dial"}, "call_unique_id"),
        ({"enterprise_number": "0367", "event_type": "dial", "call_unique_id": "a b"}, "unique"),
        (
            {
                "enterprise_number": "0367",
                "event_type": "dial",
                "call_unique_id": "1",
                "payload": 5,
            },
            "payload",
        ),
        (
            {
                "enterprise_number": "0367",
                "event_type": "dial",
                "call_unique_id": "1",
                "payload": {"Extensions": {"a": 1}},
            },
            "Extensions",
        ),
        (
            {
                "enterprise_number": "0367",
                "event_type": "hangup",
                "call_unique_id": "1",
                "payload": {"x": object()},
            },
            "JSON",
        ),
        (
            {
                "enterprise_number": "0367",
                "event_type": "hangup",
                "call_unique_id": "1",
                "payload": {"x": "y" * 70_000},
            },
            "bytes",
        ),
        (
            {
                "enterprise_number": "0367",
                "event_type": "dial",
                "call_unique_id": "1",
                "origin": "download",
            },
            "recovered",
        ),
        (
            {
                "enterprise_number": "0367",
                "event_type": "hangup",
                "call_unique_id": "1",
                "occurred_at": "2025-11-26 10:00:00",
            },
            "timezone",
        ),
        (
            {
                "enterprise_number": "0367",
                "event_type": "hangup",
                "call_unique_id": "1",
                "occurred_at": "yesterday",
            },
            "ISO",
        ),
        (
            {"enterprise_number": "0367", "event_type": ["dial"], "call_unique_id": "1"},
            "event_type",
        ),
        (
            {"enterprise_number": "0367", "event_type": {"a": 1}, "call_unique_id": "1"},
            "event_type",
        ),
        (
            {
                "enterprise_number": "0367",
                "event_type": "hangup",
                "call_unique_id": "1",
                "origin": ["download"],
            },
            "origin",
        ),
    ],
)
def test_invalid_events_raise_value_error_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CallEvent(**kwargs)


def test_wire_form_follows_the_service_contract_and_ignores_later_mutation() -> None:
    payload = {"UniqueId": "1.2", "Phone": "+375291234567", "Extensions": ["150"]}
    when = datetime(2025, 11, 26, 10, 0, tzinfo=UTC)
    event = CallEvent(
        enterprise_number="0367", event_type="dial", payload=payload, occurred_at=when
    )
    payload["Phone"] = "changed"
    wire = json.loads(event.wire)
    assert wire == {
        "enterprise_number": "0367",
        "event_type": "dial",
        "call_unique_id": "1.2",
        "payload": {"UniqueId": "1.2", "Phone": "+375291234567", "Extensions": ["150"]},
        "occurred_at": "2025-11-26T10:00:00+00:00",
        "origin": "live",
        "idempotency_key": "0367:1.2:dial:150",
    }
    assert event.payload["Phone"] == "+375291234567"


def test_event_is_immutable() -> None:
    event = _dial(["150"])
    with pytest.raises(AttributeError):
        event.event_type = "hangup"  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.payload["Phone"] = "x"  # type: ignore[index]


def test_popups_are_dial_and_bridge_only() -> None:
    assert _dial(["150"]).is_popup
    assert not CallEvent(enterprise_number="1", event_type="hangup", call_unique_id="1").is_popup
