"""The module's clientId as a credential: it opens an admin session only for an active, enabled
enterprise; unknown clientIds are limited per source address and logged without flooding."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings

ON = "on-" + "a" * 40
OFF = "off-" + "b" * 40
INACTIVE = "inactive-" + "c" * 40


def _retailcrm(client_id: str, *, enabled: bool = True) -> dict[str, object]:
    return {
        "enabled": enabled,
        "domain": "http://127.0.0.1:9",
        "api_key": "k" * 32,
        "clientId": client_id,
    }


@pytest.fixture
async def http(database_url: str, db: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    await create_enterprise(db, "0367", integrations={"retailcrm": _retailcrm(ON)})
    await create_enterprise(db, "0368", integrations={"retailcrm": _retailcrm(OFF, enabled=False)})
    await create_enterprise(
        db, "0369", active=False, integrations={"retailcrm": _retailcrm(INACTIVE)}
    )
    async with (
        running_service(service_settings(database_url)) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as client,
    ):
        yield client


def _from(source: str) -> dict[str, str]:
    # The service's peer is loopback, so X-Real-IP (set by nginx) names the caller.
    return {"X-Real-IP": source}


async def test_a_client_id_opens_an_admin_session_only_while_the_integration_is_on(
    http: httpx.AsyncClient,
) -> None:
    for client_id in (OFF, INACTIVE):
        reply = await http.post("/retailcrm-admin/login", data={"clientId": client_id})
        assert reply.status_code == 403
        assert reply.json()["error"]["code"] == "disabled"
        assert "set-cookie" not in reply.headers
    reply = await http.post("/retailcrm-admin/login", data={"clientId": ON})
    assert reply.status_code == 303
    assert "retailcrm_admin_session=" in reply.headers["set-cookie"]


async def test_unknown_client_ids_are_refused_per_source_and_logged_without_flooding(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    statuses = []
    for i in range(200):
        guess = f"guess-{i:04d}-" + "x" * 30
        if i % 2:
            reply = await http.post(
                "/retailcrm/status",
                data={"clientId": guess, "userId": "7", "status": "busy"},
                headers=_from("203.0.113.7"),
            )
        else:
            reply = await http.post(
                "/retailcrm-admin/login", data={"clientId": guess}, headers=_from("203.0.113.7")
            )
        statuses.append(reply.status_code)
        if reply.status_code == 429:
            assert int(reply.headers["retry-after"]) >= 1
    assert set(statuses) == {401, 429}
    assert statuses.index(429) == statuses.count(401)  # refused from the first over the limit
    assert statuses.count(401) <= 20
    # RetailCRM's callbacks from the same address still work (a proxy may be shared); the
    # failures of one address do not limit another.
    known = await http.post(
        "/retailcrm/status",
        data={"clientId": ON, "userId": "7", "status": "busy"},
        headers=_from("203.0.113.7"),
    )
    assert known.status_code == 200
    other = await http.post(
        "/retailcrm/status",
        data={"clientId": "guess-other-" + "x" * 30, "userId": "7", "status": "busy"},
        headers=_from("198.51.100.4"),
    )
    assert other.status_code == 401
    failures = [r for r in caplog.records if "unknown_client" in r.getMessage()]
    assert 1 <= len(failures) <= 3
    assert all("guess-" not in r.getMessage() for r in caplog.records)
