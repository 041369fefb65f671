"""End to end in real processes: vochi-call-service -> retailcrm-service serve -> the sandbox.

One test drives the host webhooks through the reference call service; the other posts the
contract's ``{"events": [...]}`` batches straight to the service (as the call service does).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.pipeline import (
    add_enterprise,
    expected_calls,
    fixture_events,
    fixture_records,
    prepare_sandbox,
    run_async,
    wait_drained,
)
from tests.support.procs import ServiceProcess

ACCOUNT = "account-1"
FAST_ENV = {
    "RETAILCRM_DELIVERY_POLL_INTERVAL": "0.1",
    "RETAILCRM_OUTBOX_LEASE_SECONDS": "3",
    "RETAILCRM_OUTBOX_RETRY_CAP": "3",
    "RETAILCRM_DELIVERY_BREAKER_OPEN_MAX": "3",
}


@pytest.fixture
def api_key() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def crm(api_key: str) -> Iterator[ServiceProcess]:
    with ServiceProcess.sandbox(api_keys=[api_key]) as proc:
        prepare_sandbox(proc.url, api_key, account=ACCOUNT)
        yield proc


@pytest.fixture
def enterprise(database_url: str, crm: ServiceProcess, api_key: str) -> str:
    run_async(add_enterprise, database_url, crm.url, api_key)
    return "0367"


def sandbox_state(crm: ServiceProcess) -> dict[str, Any]:
    return httpx.get(crm.url + "/_sandbox/state", timeout=10).json()  # type: ignore[no-any-return]


def post_events(service: ServiceProcess, events: list[dict[str, Any]], batch: int = 4) -> None:
    for start in range(0, len(events), batch):
        response = httpx.post(
            service.url + "/api/events", json={"events": events[start : start + batch]}, timeout=10
        )
        assert response.status_code == 202, response.text


@pytest.mark.slow
def test_fixture_calls_give_exactly_the_expected_sandbox_state(
    database_url: str, crm: ServiceProcess, enterprise: str
) -> None:
    with ServiceProcess.service(database_url, env=FAST_ENV) as service:
        post_events(service, fixture_events())
        states = asyncio.run(wait_drained(database_url))
        stats = httpx.get(service.url + "/stats", timeout=5).json()["outbox"]
    assert set(states) <= {"delivered", "skipped"}
    state = sandbox_state(crm)
    account = state["accounts"][ACCOUNT]
    calls = {c["externalId"]: c for c in account["calls"]}
    assert set(calls) == set(expected_calls())
    for external_id, fields in expected_calls().items():
        assert {k: calls[external_id].get(k) for k in fields} == fields, external_id
    assert all(c["duplicates"] == 0 for c in account["calls"])
    by_call: dict[str, set[int]] = {}
    for popup in account["popups"]:
        by_call.setdefault(popup["callExternalId"], set()).add(popup["userId"])
    assert by_call == {
        "1764150000.101": {19, 20, 21},  # the escalated dial reached manager 152 (user 21)
        "1764150100.205": {19},
        "1764150200.310": {20},
    }
    assert account["openPopups"] == {}
    assert [p["hangupStatus"] for p in account["popups"] if p["state"] == "closed"].count(
        "answered"
    ) == 4
    # (e) a normal run never trips RetailCRM's rate limit
    assert state["rateLimitRejections"]["count"] == 0
    assert stats["enterprises"][enterprise]["dead"] == 0


@pytest.mark.slow
def test_reference_call_service_to_service_to_sandbox(
    database_url: str, crm: ServiceProcess, enterprise: str
) -> None:
    """The host webhooks of the fixture, through vochi-call-service, end as the same state."""
    with ServiceProcess.service(database_url, env=FAST_ENV) as service:
        targets = {"retailcrm": service.url + "/api/events"}
        with (
            ServiceProcess.call_service(database_url, targets=targets) as calls,
            httpx.Client(timeout=10) as http,
        ):
            for record in fixture_records():
                body = record["body"]
                response = http.post(
                    f"{calls.url}/{record['event']}", json=body, headers={"Token": body["Token"]}
                )
                assert response.status_code == 200, response.text
            wait_for_rows(database_url, 12)
            states = asyncio.run(wait_drained(database_url))
    assert set(states) <= {"delivered", "skipped"}
    account = sandbox_state(crm)["accounts"][ACCOUNT]
    calls_by_id = {c["externalId"]: c for c in account["calls"]}
    assert set(calls_by_id) == set(expected_calls())
    for external_id, fields in expected_calls().items():
        assert {k: calls_by_id[external_id].get(k) for k in fields} == fields, external_id
    assert {p["userId"] for p in account["popups"]} == {19, 20, 21}
    assert account["openPopups"] == {}
    assert not [p for p in account["popups"] if p["callExternalId"] == "1764140000.77"]


def wait_for_rows(database_url: str, n: int, timeout: float = 20.0) -> None:
    """Until the call service's batches have reached the outbox (it emits asynchronously)."""

    async def count(conn: Any) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM retailcrm_outbox"))

    deadline = time.monotonic() + timeout
    while run_async(count, database_url) < n:
        assert time.monotonic() < deadline, "the call service did not forward the events"
        time.sleep(0.1)
