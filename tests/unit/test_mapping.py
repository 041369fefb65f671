"""The mapping of every fixture call to RetailCRM entities, and the vocabulary rules."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retailcrm_service.crm.mapping import (
    HANGUP_STATUSES,
    UPLOAD_RESULTS,
    MappingConfig,
    Skip,
    call_type,
    hangup_status,
    history_call,
    kinds_for,
    normalize_phone,
    popup_event,
    upload_batches,
    upload_result,
)
from tests.support.pipeline import fixture_records

USERS = {"19": "150", "20": "151", "21": "152", "22": None}
CONFIG = MappingConfig(user_extensions=USERS)


def _fixture_calls() -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {}
    for record in fixture_records():
        calls.setdefault(record["call"], []).append(record)
    return calls


CALLS = _fixture_calls()


def _map_call(name: str, config: MappingConfig = CONFIG) -> tuple[list[Any], list[Any]]:
    """Run one fixture call through the mapping as the delivery does: (popups, history)."""
    popups: list[Any] = []
    history: list[Any] = []
    bridges: list[dict[str, Any]] = []
    for record in CALLS[name]:
        body = record["body"]
        origin = body.get("origin", "live")
        for kind in kinds_for(record["event"], origin):
            if kind == "popup":
                popups.append(popup_event(record["event"], body, config))
            elif kind == "history":
                history.append(history_call(body, config, bridges))
            else:
                bridges.append(body)
    return popups, history


def test_fixture_has_the_calls_this_module_is_pinned_against() -> None:
    assert len(CALLS) == 7


def test_ring_group_escalation_popups_each_dial_and_attributes_to_the_bridge() -> None:
    popups, history = _map_call("incoming answered after ring-group escalation")
    assert popups == [
        {
            "phone": "+375291234567",
            "codes": ["150", "151"],
            "type": "in",
            "callExternalId": "1764150000.101",
        },
        {
            "phone": "+375291234567",
            "codes": ["150", "151", "152"],
            "type": "in",
            "callExternalId": "1764150000.101",
        },
        {
            "phone": "+375291234567",
            "codes": ["150", "151", "152"],
            "type": "hangup",
            "hangupStatus": "answered",
            "callExternalId": "1764150000.101",
        },
    ]
    assert history == [
        {
            "date": "2025-11-26 10:00:00",
            "type": "in",
            "phone": "+375291234567",
            "result": "answered",
            "duration": 161,
            "durationWaiting": 3,
            "externalId": "1764150000.101",
            "code": "152",
            "userId": 21,
            "recordUrl": "https://pbx.example/recordings/file/3f6c1d2e-aaaa-bbbb-cccc-0123456789ab",
        }
    ]


def test_missed_call_with_string_calltype_and_empty_starttime() -> None:
    popups, history = _map_call("incoming missed, string CallType, phone without plus")
    assert [p["type"] for p in popups] == ["in", "hangup"]
    assert popups[0]["phone"] == "+375447034448"
    assert popups[1]["hangupStatus"] == "no answered"
    assert history == [
        {
            "date": "2025-11-26 10:05:00",
            "type": "in",
            "phone": "+375447034448",
            "result": "no answer",
            "duration": 0,
            "durationWaiting": 31,
            "externalId": "1764150100.205",
            "code": "150",
            "userId": 19,
        }
    ]


def test_outgoing_answered_is_attributed_to_the_calling_manager() -> None:
    popups, history = _map_call("outgoing answered")
    assert popups[0] == {
        "phone": "+375293193330",
        "codes": ["151"],
        "type": "out",
        "callExternalId": "1764150200.310",
    }
    assert popups[1]["type"] == "hangup"
    assert popups[1]["hangupStatus"] == "answered"
    assert history[0]["type"] == "out"
    assert (history[0]["code"], history[0]["userId"]) == ("151", 20)
    assert (history[0]["duration"], history[0]["durationWaiting"]) == (180, 7)


def test_internal_call_is_skipped_by_default() -> None:
    popups, history = _map_call("internal call (not forwarded by default)")
    assert popups == [Skip("internal call"), Skip("internal call")]
    assert history == [Skip("internal call")]


def test_internal_call_is_forwarded_when_the_enterprise_enables_it() -> None:
    config = MappingConfig(user_extensions=USERS, internal_calls=True)
    popups, history = _map_call("internal call (not forwarded by default)", config)
    assert popups[0] == {
        "phone": "150",
        "codes": ["151"],
        "type": "in",
        "callExternalId": "1764150300.400",
    }
    assert history[0]["result"] == "answered"
    assert history[0]["duration"] == 38


def test_lost_extensions_and_unknown_number_send_nothing() -> None:
    popups, history = _map_call("incoming with lost extensions and unknown number")
    assert popups == [Skip("no customer phone"), Skip("no customer phone")]
    assert history == [Skip("no customer phone")]


def test_crm_originated_internal_leg_is_never_forwarded() -> None:
    config = MappingConfig(internal_calls=True)
    popups, history = _map_call("click-to-call leg originated by the CRM", config)
    assert popups == [Skip("CRM-originated internal leg")]
    assert history == []


def test_recovered_hangup_uploads_history_without_a_popup() -> None:
    popups, history = _map_call("recovered hangup, hours later (history only, no popup)")
    assert popups == []
    assert history[0]["externalId"] == "1764140000.77"
    assert history[0]["date"] == "2025-11-26 07:13:20"
    assert (history[0]["duration"], history[0]["durationWaiting"]) == (95, 5)


def test_every_fixture_call_uses_only_the_documented_vocabularies() -> None:
    for name in CALLS:
        popups, history = _map_call(name, MappingConfig(internal_calls=True))
        for popup in popups:
            if isinstance(popup, dict) and popup["type"] == "hangup":
                assert popup["hangupStatus"] in HANGUP_STATUSES
        for call in history:
            if isinstance(call, dict):
                assert call["result"] in UPLOAD_RESULTS
                assert call["duration"] >= 0
                assert call["durationWaiting"] >= 0


def test_host_time_is_converted_to_the_account_timezone() -> None:
    config = MappingConfig(timezone="Europe/Minsk", account_timezone="Asia/Yekaterinburg")
    body = CALLS["outgoing answered"][-1]["body"]
    call = history_call(body, config)
    assert isinstance(call, dict)
    assert call["date"] == "2025-11-26 12:10:00"


def test_negative_durations_are_clamped_to_zero() -> None:
    body = {
        "UniqueId": "1.1",
        "Phone": "+375291234567",
        "Extensions": ["150"],
        "CallType": 0,
        "DateReceived": "2025-11-26 10:00:10",
        "StartTime": "2025-11-26 10:00:20",
        "EndTime": "2025-11-26 10:00:00",
        "CallStatus": "2",
    }
    call = history_call(body, CONFIG)
    assert isinstance(call, dict)
    assert (call["duration"], call["durationWaiting"]) == (0, 10)


@pytest.mark.parametrize(
    ("status", "hangup", "result"),
    [
        ("2", "answered", "answered"),
        ("5", "answered", "answered"),
        ("0", "no answered", "no answer"),
        ("1", "cancel", "unknown"),
        ("", "cancel", "unknown"),
        (None, "cancel", "unknown"),
    ],
)
def test_call_status_vocabulary(status: Any, hangup: str, result: str) -> None:
    assert hangup_status(status) == hangup
    assert upload_result(status) == result


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("375447034448", "+375447034448"),
        ("+375293193330", "+375293193330"),
        ("<unknown>", ""),
        ("150", "150"),
        ("+7 (900) 123-45-67", "+79001234567"),
        (None, ""),
        (True, ""),
    ],
)
def test_phones_are_normalised(raw: Any, normalised: str) -> None:
    assert normalize_phone(raw) == normalised


def test_malformed_optional_config_falls_back_to_defaults() -> None:
    config = MappingConfig.from_config(
        {"timezone": "Mars/Olympus", "user_extensions": "oops", "internal_calls": "yes"}
    )
    assert config == MappingConfig()


def test_uploads_are_batched_by_at_most_fifty_calls() -> None:
    calls = [{"externalId": str(i)} for i in range(120)]
    assert [len(b) for b in upload_batches(calls)] == [50, 50, 20]


_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.lists(st.text(max_size=6))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "UniqueId",
                "Phone",
                "Extensions",
                "CallType",
                "DateReceived",
                "StartTime",
                "EndTime",
                "CallStatus",
                "record_url",
                "ExternalInitiated",
            ]
        ),
        _values,
    )
)
def test_mapping_never_raises_on_hostile_payloads(payload: dict[str, Any]) -> None:
    for event_type in ("dial", "hangup"):
        assert isinstance(popup_event(event_type, payload, CONFIG), dict | Skip)
    assert isinstance(history_call(payload, CONFIG, [payload]), dict | Skip)


@pytest.mark.parametrize(
    ("raw", "expected"), [(0, 0), ("1", 1), (" 2 ", 2), ("²", None), ("١", None)]
)
def test_call_type_reads_ascii_digits_only(raw: object, expected: int | None) -> None:
    """``str.isdigit`` admits '²' (which ``int`` refuses) and Arabic-Indic digits."""
    assert call_type({"CallType": raw}) == expected
