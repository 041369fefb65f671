"""``parse_retry_after``: delta-seconds or an HTTP-date, capped, anything else refused."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from retailcrm_service.crm.client import RetailCrmClient, RetailCrmRateLimited
from vochi_crm_client import parse_retry_after

NOW = datetime(2025, 11, 26, 10, 0, 0, tzinfo=UTC)


def test_seconds_and_http_dates_are_read_and_a_past_date_means_now() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("Wed, 26 Nov 2025 10:00:30 GMT", now=NOW) == 30.0
    assert parse_retry_after("Wed, 26 Nov 2025 09:00:00 GMT", now=NOW) == 0.0


@pytest.mark.parametrize(
    "raw", [None, "", "garbage", "²", "-1", "1.5", "1e3", "inf", "nan", "Infinity", "9" * 400]
)
def test_anything_but_digits_or_a_date_is_refused(raw: str | None) -> None:
    assert parse_retry_after(raw) is None


def test_waits_are_capped() -> None:
    assert parse_retry_after("3600", cap=5.0) == 5.0
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=NOW) == 300.0
    with pytest.raises(ValueError, match="cap"):
        parse_retry_after("1", cap=math.inf)


@given(st.integers(min_value=0, max_value=10**30), st.floats(min_value=0, max_value=1e6))
def test_delta_seconds_give_the_value_up_to_the_cap(seconds: int, cap: float) -> None:
    assert parse_retry_after(str(seconds), cap=cap) == min(float(seconds), cap)


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_http_dates_give_the_seconds_from_now_clamped_to_zero_and_the_cap(offset: int) -> None:
    when = NOW + timedelta(seconds=offset)
    got = parse_retry_after(format_datetime(when, usegmt=True), now=NOW, cap=1000.0)
    assert got == min(max(0.0, float(offset)), 1000.0)


@given(st.text(max_size=40))
def test_any_header_value_gives_none_or_a_finite_wait_within_the_cap(raw: str) -> None:
    got = parse_retry_after(raw, cap=60.0, now=NOW)
    assert got is None or (math.isfinite(got) and 0.0 <= got <= 60.0)


@pytest.mark.parametrize(("header", "expected"), [("2", 2.0), ("inf", None), ("86400", 300.0)])
async def test_the_retailcrm_client_reports_the_parsed_retry_after(
    header: str, expected: float | None
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": header}, text="")

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = RetailCrmClient(domain="https://acme.retailcrm.ru", api_key="k" * 32, http=http)
        with pytest.raises(RetailCrmRateLimited) as caught:
            await client.credentials()
    assert caught.value.retry_after == expected
