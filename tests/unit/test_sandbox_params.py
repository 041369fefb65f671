"""Parameter parsing of the sandbox: PHP bracket notation, scalars, JSON fields, booleans."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retailcrm_service.sandbox import ApiError
from retailcrm_service.sandbox._params import (
    as_list,
    filter_params,
    json_field,
    parse_bool,
    parse_params,
    scalar,
)
from retailcrm_service.sandbox._ratelimit import SlidingWindowLimiter
from retailcrm_service.sandbox._state import mask, phones_match


def test_bracket_notation_builds_nested_params_like_php() -> None:
    params = parse_params(
        [
            ("filter[groups][]", "manager"),
            ("filter[groups][]", "admins"),
            ("filter[isManager]", "1"),
            ("limit", "50"),
        ]
    )
    assert params == {
        "filter": {"groups": {"0": "manager", "1": "admins"}, "isManager": "1"},
        "limit": "50",
    }
    assert as_list(params["filter"]["groups"]) == ["manager", "admins"]


def test_malformed_brackets_stay_literal_keys() -> None:
    assert parse_params([("a[b", "1"), ("[x]", "2")]) == {"a[b": "1", "[x]": "2"}


def test_nested_keys_for_a_scalar_parameter_are_the_non_scalar_error() -> None:
    params = parse_params([("integrationModule[code]", "x")])
    with pytest.raises(ApiError) as err:
        scalar(params, "integrationModule")
    assert err.value.status == 400
    assert err.value.message == 'Input value "integrationModule" contains a non-scalar value'


def test_absent_parameter_is_the_missing_error() -> None:
    with pytest.raises(ApiError) as err:
        scalar({}, "event")
    assert (err.value.status, err.value.message) == (400, "Parameter 'event' is missing")


def test_undecodable_json_field_is_an_entity_format_error() -> None:
    with pytest.raises(ApiError) as err:
        json_field({"event": "{not json"}, "event")
    assert err.value.message == "Errors in the entity format"
    assert err.value.errors == {"event": "This value is not valid JSON."}


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("0", False), (None, False)])
def test_numeric_booleans_are_accepted_strictly(raw: str | None, value: bool) -> None:
    assert parse_bool("details", raw, strict=True) is value


@pytest.mark.parametrize("raw", ["True", "true", "yes", "2"])
def test_python_booleans_are_rejected_when_strict(raw: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_bool("details", raw, strict=True)
    assert err.value.message == "Errors in the input parameters"


@pytest.mark.parametrize(("raw", "value"), [("True", True), ("false", False)])
def test_python_booleans_are_accepted_when_lenient(raw: str, value: bool) -> None:
    assert parse_bool("details", raw, strict=False) is value


def test_a_scalar_filter_is_an_input_error() -> None:
    """The official Python client turns ``filters=None`` into a literal ``filter=None``."""
    with pytest.raises(ApiError) as err:
        filter_params({"filter": "None"})
    assert err.value.message == "Errors in the input parameters"


def test_secrets_are_masked_to_at_most_four_characters() -> None:
    assert mask("0123456789abcdef") == "***cdef"
    assert mask("short") == "***"


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("+375291234567", "375291234567", True),
        ("+7 900 123-45-67", "89001234567", True),
        ("+375291234567", "+375291234568", False),
        ("<unknown>", "<unknown>", False),
    ],
)
def test_phone_numbers_match_by_digits(a: str, b: str, same: bool) -> None:
    assert phones_match(a, b) is same


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_eleventh_request_inside_one_second_is_refused() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits={"general": 10}, clock=clock)
    results = []
    for _ in range(11):
        results.append(limiter.allow("k", "general"))
        clock.now += 0.09
    assert results == [True] * 10 + [False]


def test_a_request_exactly_one_second_after_the_first_is_allowed_again() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits={"general": 10}, clock=clock)
    assert all(limiter.allow("k", "general") for _ in range(10))
    clock.now += 0.999
    assert not limiter.allow("k", "general")
    clock.now += 0.001
    assert limiter.allow("k", "general")


def test_refused_requests_do_not_count_and_paced_clients_are_never_refused() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits={"general": 10}, clock=clock)
    for _ in range(100):
        assert limiter.allow("k", "general")
        clock.now += 0.1


def test_limits_are_per_key_and_per_bucket() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits={"general": 1, "telephony": 2}, clock=clock)
    assert limiter.allow("a", "general")
    assert not limiter.allow("a", "general")
    assert limiter.allow("b", "general")
    assert limiter.allow("a", "telephony")
    assert limiter.allow("a", "telephony")
    assert not limiter.allow("a", "telephony")


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=0.5, allow_nan=False), max_size=80),
    limit=st.integers(min_value=1, max_value=12),
)
def test_limiter_never_admits_more_than_the_limit_in_any_window(
    gaps: list[float], limit: int
) -> None:
    """Accepted requests never exceed the limit inside a second; a refusal means it was full."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits={"general": limit}, clock=clock)
    accepted: list[float] = []
    for gap in gaps:
        clock.now += gap
        recent = [t for t in accepted if t > clock.now - 1.0 + 1e-6]
        if limiter.allow("k", "general"):
            assert len(recent) < limit
            accepted.append(clock.now)
        else:
            assert len(recent) >= limit
