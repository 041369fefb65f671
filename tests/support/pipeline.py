"""Shared setup for pipeline tests: the fixture calls as contract events, a sandbox account wired
to an enterprise, and waiting for the outbox to drain; for the end-to-end tests, the pytest
fixtures ``api_key``, ``crm`` (the sandbox process) and ``enterprise`` (import
``api_key_fixture, crm_fixture, enterprise_fixture``)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.procs import ServiceProcess

# A copy of the platform's shared/fixtures/asterisk-calls.jsonl, so the suite runs from any clone.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "asterisk-calls.jsonl"
ENTERPRISE = "0367"
USER_EXTENSIONS = {"19": "150", "20": "151", "21": "152"}
MODULE_CODE = "vochi-telephony"


def fixture_records() -> list[dict[str, Any]]:
    lines = FIXTURES.read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def fixture_events(enterprise: str = ENTERPRISE) -> list[dict[str, Any]]:
    """Every fixture webhook (but ``start``) as the call service posts it (README.md's routes)."""
    events = []
    for record in fixture_records():
        if record["event"] == "start":
            continue
        body = dict(record["body"])
        event: dict[str, Any] = {
            "enterprise_number": enterprise,
            "event_type": record["event"],
            "call_unique_id": body["UniqueId"],
            "payload": body,
        }
        if body.get("origin") == "download":
            event["origin"] = "download"
        events.append(event)
    return events


def sandbox_users() -> list[dict[str, Any]]:
    return [
        {"id": int(uid), "firstName": f"Manager {ext}", "status": "free", "online": True}
        for uid, ext in USER_EXTENSIONS.items()
    ]


def module(base_url: str) -> dict[str, Any]:
    """The telephony module as our service registers it: enough for call events."""
    return {
        "code": MODULE_CODE,
        "integrationCode": MODULE_CODE,
        "active": True,
        "name": "Vochi-CRM",
        "logo": f"{base_url}/logo.svg",
        "baseUrl": base_url,
        "clientId": "e2e-client-id-0123456789abcdef0123456789",
        "integrations": {
            "telephony": {
                "makeCallUrl": f"{base_url}/retailcrm/make-call",
                "allowEdit": False,
                "inputEventSupported": True,
                "outputEventSupported": True,
                "hangupEventSupported": True,
                "additionalCodes": [
                    {"userId": int(uid), "code": ext} for uid, ext in USER_EXTENSIONS.items()
                ],
            }
        },
    }


def prepare_sandbox(sandbox_url: str, api_key: str, account: str = "test") -> None:
    """Seed the users and register the telephony module for ``api_key``."""
    httpx.post(
        f"{sandbox_url}/_sandbox/seed",
        json={"accounts": [{"name": account, "api_key": api_key, "users": sandbox_users()}]},
        timeout=10,
    ).raise_for_status()
    response = httpx.post(
        f"{sandbox_url}/api/v5/integration-modules/{MODULE_CODE}/edit",
        data={"integrationModule": json.dumps(module("https://pbx.example"))},
        headers={"X-API-KEY": api_key},
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text


async def add_enterprise(
    conn: asyncpg.Connection, sandbox_url: str, api_key: str, number: str = ENTERPRISE, **extra: Any
) -> None:
    config = {
        "enabled": True,
        "domain": sandbox_url,
        "api_key": api_key,
        "user_extensions": USER_EXTENSIONS,
        **extra,
    }
    await conn.execute(
        """INSERT INTO enterprises (number, name, name2, secret, integrations_config)
           VALUES ($1, $2, $3, $4, jsonb_build_object('retailcrm', $5::jsonb))""",
        number,
        f"Enterprise {number}",
        "375291110001" if number == ENTERPRISE else f"token-{number}",
        f"{number:0>32}",
        json.dumps(config),
    )


def run_async(fn: Any, database_url: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``await fn(conn, *args)`` on a fresh connection to ``database_url`` (sync tests)."""

    async def go() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            return await fn(conn, *args, **kwargs)
        finally:
            await conn.close()

    return asyncio.run(go())


async def wait_drained(database_url: str, timeout: float = 30.0) -> dict[str, int]:
    """Until no outbox row is pending; returns the count of rows per state."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch("SELECT state, count(*) AS n FROM retailcrm_outbox GROUP BY 1")
            states = {r["state"]: r["n"] for r in rows}
            if not states.get("pending") or time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def expected_calls() -> dict[str, dict[str, Any]]:
    """The calls RetailCRM must hold after the fixture, by externalId (see test_mapping)."""
    return {
        "1764150000.101": {
            "date": "2025-11-26 10:00:00",
            "type": "in",
            "phone": "+375291234567",
            "result": "answered",
            "duration": 161,
            "durationWaiting": 3,
            "code": "152",
            "userId": 21,
            "recordUrl": "https://pbx.example/recordings/file/3f6c1d2e-aaaa-bbbb-cccc-0123456789ab",
        },
        "1764150100.205": {
            "type": "in",
            "result": "no answer",
            "duration": 0,
            "durationWaiting": 31,
            "code": "150",
            "userId": 19,
        },
        "1764150200.310": {"type": "out", "result": "answered", "code": "151", "userId": 20},
        "1764140000.77": {"type": "in", "result": "answered", "duration": 95},
    }


# -- end-to-end: real processes (fixtures imported by the e2e pipeline and fault tests) --

ACCOUNT = "account-1"
FAST_ENV = {
    "RETAILCRM_DELIVERY_POLL_INTERVAL": "0.1",
    "RETAILCRM_OUTBOX_LEASE_SECONDS": "3",
    "RETAILCRM_OUTBOX_RETRY_CAP": "3",
    "RETAILCRM_DELIVERY_BREAKER_OPEN_MAX": "3",
}


@pytest.fixture(name="api_key")
def api_key_fixture() -> str:
    """A fresh RetailCRM API key."""
    return secrets.token_hex(16)


@pytest.fixture(name="crm")
def crm_fixture(api_key: str) -> Iterator[ServiceProcess]:
    """The sandbox as a process, its ``ACCOUNT`` seeded and the telephony module registered."""
    with ServiceProcess.sandbox(api_keys=[api_key]) as proc:
        prepare_sandbox(proc.url, api_key, account=ACCOUNT)
        yield proc


@pytest.fixture(name="enterprise")
def enterprise_fixture(database_url: str, crm: ServiceProcess, api_key: str) -> str:
    """The enterprise ``ENTERPRISE`` wired to the sandbox account."""
    run_async(add_enterprise, database_url, crm.url, api_key)
    return ENTERPRISE


def sandbox_state(crm: ServiceProcess) -> dict[str, Any]:
    return httpx.get(crm.url + "/_sandbox/state", timeout=10).json()  # type: ignore[no-any-return]


def post_events(service: ServiceProcess, events: list[dict[str, Any]], batch: int = 4) -> None:
    for start in range(0, len(events), batch):
        response = httpx.post(
            service.url + "/api/events", json={"events": events[start : start + batch]}, timeout=10
        )
        assert response.status_code == 202, response.text
