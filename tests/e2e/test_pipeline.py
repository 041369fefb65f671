"""End to end in real processes: vochi-call-service -> retailcrm-service serve -> the sandbox.

One test drives the host webhooks through the reference call service; the other posts the
contract's ``{"events": [...]}`` batches straight to the service (as the call service does).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.support.pipeline import (  # noqa: F401  (api_key, crm, enterprise: pytest fixtures)
    ACCOUNT,
    FAST_ENV,
    api_key_fixture,
    crm_fixture,
    enterprise_fixture,
    expected_calls,
    fixture_events,
    fixture_records,
    post_events,
    run_async,
    sandbox_state,
    wait_drained,
)
from tests.support.procs import ServiceProcess


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
