"""Host payload -> CallEvent over every fixture line, and each host quirk on its own."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from adapters.translate import Skipped, Translator, translate
from tests.support.pipeline import fixture_records
from vochi_crm_client._event import CallEvent

NOW = datetime(2025, 11, 26, 10, 0, tzinfo=UTC)

# Line of the fixture file -> the expected idempotency key, or the skip reason.
EXPECTED: list[str] = [
    "skip:start",
    "0367:1764150000.101:dial:150,151",
    "0367:1764150000.101:dial:150,151,152",
    "0367:1764150000.101:bridge",
    "0367:1764150000.101:hangup",
    "0367:1764150100.205:dial:150",
    "0367:1764150100.205:hangup",
    "0367:1764150200.310:dial:151",
    "0367:1764150200.310:bridge",
    "0367:1764150200.310:hangup",
    "skip:internal",
    "skip:internal",
    "0367:1764150400.512:dial:",
    "0367:1764150400.512:hangup",
    "skip:crm_originated",
    "0367:1764140000.77:hangup",
]


def run(line: dict[str, Any]) -> CallEvent | Skipped:
    return translate(line["event"], line["body"], enterprise_number="0367", received_at=NOW)


def test_every_fixture_line_translates_as_expected() -> None:
    lines = fixture_records()
    assert len(lines) == len(EXPECTED)
    for line, expected in zip(lines, EXPECTED, strict=True):
        result = run(line)
        if expected.startswith("skip:"):
            assert result == Skipped(expected[5:]), line["call"]
        else:
            assert isinstance(result, CallEvent), line["call"]
            assert result.idempotency_key == expected, line["call"]
            assert "Token" not in result.payload


def test_a_string_call_type_and_trunk_id_are_normalised() -> None:
    event = run(fixture_records()[5])
    assert isinstance(event, CallEvent)
    assert event.payload["CallType"] == 0
    assert event.payload["Trunk"] == "0001363"
    assert "TrunkId" not in event.payload


def test_lost_extensions_unknown_phone_and_incall_trunk_are_normalised() -> None:
    event = run(fixture_records()[12])
    assert isinstance(event, CallEvent)
    assert event.payload["Extensions"] == []
    assert event.payload["Phone"] == ""
    assert event.payload["Trunk"] == "0001363"
    assert "INCALL" not in event.payload


def test_an_empty_start_time_falls_back_to_date_received() -> None:
    event = run(fixture_records()[6])
    assert isinstance(event, CallEvent)
    assert event.payload["StartTime"] == "2025-11-26 10:05:00"


def test_the_recovered_hangup_is_history_only_without_a_time_of_receipt() -> None:
    event = run(fixture_records()[15])
    assert isinstance(event, CallEvent)
    assert event.event_type == "hangup"
    assert event.origin == "download"
    assert event.occurred_at is None
    assert not event.is_popup
    assert "origin" not in event.payload


def test_post_download_is_a_recovered_hangup_too() -> None:
    body = dict(fixture_records()[4]["body"])
    event = translate("download", body, enterprise_number="0367")
    assert isinstance(event, CallEvent)
    assert (event.event_type, event.origin) == ("hangup", "download")


def test_live_events_carry_the_time_of_receipt_and_the_record_url() -> None:
    event = run(fixture_records()[4])
    assert isinstance(event, CallEvent)
    assert event.occurred_at == NOW
    assert event.origin == "live"
    assert event.payload["record_url"].startswith("https://pbx.example/")


def test_internal_calls_can_be_forwarded_when_configured() -> None:
    body = fixture_records()[10]["body"]
    event = translate("dial", body, enterprise_number="0367", forward_internal=True)
    assert isinstance(event, CallEvent)
    crm_leg = fixture_records()[14]["body"]
    assert translate("dial", crm_leg, enterprise_number="0367", forward_internal=True) == Skipped(
        "crm_originated"
    )
    assert isinstance(
        translate("dial", crm_leg, enterprise_number="0367", forward_crm_originated=True), CallEvent
    )


def test_an_external_initiated_leg_that_is_not_internal_is_forwarded() -> None:
    body = {**fixture_records()[7]["body"], "ExternalInitiated": True}
    assert isinstance(translate("dial", body, enterprise_number="0367"), CallEvent)


def test_the_translator_also_skips_the_bridge_of_a_skipped_call() -> None:
    translator = Translator()
    internal_dial = fixture_records()[10]["body"]
    bridge = {"Token": "t", "UniqueId": internal_dial["UniqueId"], "Channel": "SIP/150-1"}
    assert translator("dial", internal_dial, enterprise_number="0367") == Skipped("internal")
    assert translator("bridge", bridge, enterprise_number="0367") == Skipped("internal")
    assert isinstance(translator("bridge", bridge, enterprise_number="0400"), CallEvent)


def test_the_translator_forgets_old_skipped_calls() -> None:
    translator = Translator(remember=2)
    for uid in ("1.1", "1.2", "1.3"):
        translator(
            "dial", {"UniqueId": uid, "CallType": 2, "Extensions": ["1"]}, enterprise_number="1"
        )
    assert isinstance(translator("bridge", {"UniqueId": "1.1"}, enterprise_number="1"), CallEvent)
    assert translator("bridge", {"UniqueId": "1.3"}, enterprise_number="1") == Skipped("internal")


@pytest.mark.parametrize(
    ("event", "body", "message"),
    [
        ("ring", {"UniqueId": "1.1"}, "unknown host event"),
        ("dial", ["not", "an", "object"], "JSON object"),
        ("dial", {"CallType": 0}, "UniqueId"),
        ("start", {}, "UniqueId"),
        ("dial", {"UniqueId": "1.1", "CallType": "x"}, "CallType"),
        ("dial", {"UniqueId": "1.1", "CallType": 7}, "CallType"),
        ("dial", {"UniqueId": "1.1", "CallType": "²"}, "CallType"),  # a digit int() refuses
        ("dial", {"UniqueId": "1.1", "Extensions": {"a": 1}}, "Extensions"),
        ("dial", {"UniqueId": "1.1", "origin": "download"}, "recovered"),
    ],
)
def test_malformed_host_payloads_raise_value_error(event: str, body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        translate(event, body, enterprise_number="0367")
