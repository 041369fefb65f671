"""Parsing of POST /api/events bodies: the library's rules, one bad event rejected alone."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retailcrm_service.pipeline.intake import (
    MAX_EVENTS,
    BodyInvalid,
    BodyTooLarge,
    Rejected,
    parse_events,
    validated,
)
from retailcrm_service.pipeline.outbox import StoredEvent
from vochi_crm_client._event import CallEvent

DIAL = {
    "enterprise_number": "0367",
    "event_type": "dial",
    "payload": {"UniqueId": "1.1", "Phone": "+375291234567", "Extensions": ["151", "150"]},
}


def test_single_event_and_batch_bodies_are_both_accepted() -> None:
    (single,) = parse_events(DIAL)
    assert isinstance(single, StoredEvent)
    assert single.call_unique_id == "1.1"
    assert single.idempotency_key == "0367:1.1:dial:150,151"
    batch = parse_events({"events": [DIAL, {"event_type": "dial"}, DIAL]})
    assert [type(p) for p in batch] == [StoredEvent, Rejected, StoredEvent]
    assert batch[1] == Rejected(1, "missing field(s): enterprise_number")


def test_body_shape_errors() -> None:
    with pytest.raises(BodyTooLarge):
        parse_events({"events": [DIAL] * (MAX_EVENTS + 1)})
    with pytest.raises(BodyInvalid):
        parse_events({"events": {"not": "a list"}})
    with pytest.raises(BodyInvalid):
        parse_events([DIAL])


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"UniqueId": "1.1", "note": "nul\x00inside"}, "NUL"),
        ({"UniqueId": "1.1", "k\x00ey": 1}, "NUL"),
        ({"UniqueId": "1.1", "note": "lone \ud800 surrogate"}, "surrogate"),
        ({"UniqueId": "1.1", "x": float("nan")}, "cannot be stored"),
        ({"UniqueId": "1.1", "x": "y" * 70_000}, "more than"),
    ],
)
def test_events_postgresql_could_not_store_are_rejected_alone(
    payload: dict[str, Any], error: str
) -> None:
    bad = {"enterprise_number": "0367", "event_type": "hangup", "payload": payload}
    results = parse_events({"events": [DIAL, bad]})
    assert isinstance(results[0], StoredEvent)
    assert isinstance(results[1], Rejected)
    assert error in results[1].error


def test_deeply_nested_payload_is_rejected_not_raised() -> None:
    deep: Any = "leaf"
    for _ in range(5000):
        deep = [deep]
    (result,) = parse_events(
        {
            "enterprise_number": "0367",
            "event_type": "bridge",
            "payload": {"UniqueId": "1.1", "deep": deep},
        }
    )
    assert isinstance(result, Rejected)


_text = st.text(max_size=6)
_scalar = st.none() | st.booleans() | st.integers() | _text | st.lists(_text, max_size=2)
_event = st.fixed_dictionaries(
    {
        "enterprise_number": st.sampled_from(["0367", "", "x" * 33, "a b"]) | _scalar,
        "event_type": st.sampled_from(["dial", "bridge", "hangup", "download", "x"]) | _scalar,
    },
    optional={
        "call_unique_id": st.sampled_from(["1.1", "", " ", "a" * 129]) | _scalar,
        "payload": st.fixed_dictionaries(
            {},
            optional={
                "UniqueId": st.sampled_from(["2.2", "", "x y"]) | _scalar,
                "Extensions": st.lists(_scalar, max_size=3) | _scalar,
            },
        ),
        "occurred_at": st.sampled_from(["2025-11-26T10:00:00+03:00", "2025-11-26", "x"]) | _scalar,
        "origin": st.sampled_from(["live", "download", "other"]) | _scalar,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_event)
def test_same_verdict_and_key_as_the_librarys_call_event(item: dict[str, Any]) -> None:
    fields = {k: v for k, v in item.items() if v is not None}
    try:
        expected: CallEvent | None = CallEvent(**fields)
    except (ValueError, TypeError):
        expected = None
    try:
        got: StoredEvent | None = validated(item)
    except ValueError:
        got = None
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert got.idempotency_key == expected.idempotency_key
        assert (got.call_unique_id, got.origin) == (expected.call_unique_id, expected.origin)
