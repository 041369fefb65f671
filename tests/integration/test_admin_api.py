"""The admin's JSON API behind the pages: managers and their numbers, the journal's filters and
keyset pages, replay, diagnostics; bad input gets a clear 4xx and changes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from retailcrm_service.sandbox import AsyncSandboxServer
from retailcrm_service.security import admin_auth as auth
from tests.support.pg import create_enterprise
from tests.support.service import RunningService, running_service, service_settings

KEY = "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
USERS = [
    {"id": 19, "firstName": "Иван", "lastName": "Петров", "email": "petrov@example.by"},
    {"id": 20, "firstName": "Анна", "lastName": "Сидорова", "email": "sidorova@example.by"},
]


@pytest.fixture
async def crm() -> AsyncIterator[AsyncSandboxServer]:
    account = {"name": "acme", "api_key": KEY, "users": USERS}
    async with AsyncSandboxServer(accounts=[account], rate_limit=False) as server:
        yield server


@pytest.fixture
async def svc(
    db: asyncpg.Connection, database_url: str, crm: AsyncSandboxServer
) -> AsyncIterator[RunningService]:
    await create_enterprise(db, "0367")
    await create_enterprise(db, "0400")
    user_id = await db.fetchval(
        """INSERT INTO users (enterprise_number, first_name, last_name)
           VALUES ('0367', 'Ольга', 'Кузнецова') RETURNING id"""
    )
    for ext, owner in (("150", user_id), ("151", None)):
        await db.execute(
            """INSERT INTO user_internal_phones (user_id, phone_number, enterprise_number)
               VALUES ($1, $2, '0367')""",
            owner,
            ext,
        )
    async with running_service(service_settings(database_url), parts={"events"}) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
            saved = await http.put("/api/config/0367", json={"domain": crm.url, "api_key": KEY})
            assert saved.status_code == 200, saved.text
            registered = await http.post("/retailcrm-admin/api/register/0367")
            assert registered.status_code == 200, registered.text
        yield service


def _bearer(svc: RunningService, number: str = "0367") -> dict[str, str]:
    token = auth.issue_token(svc.runtime.settings, number, version=0, ttl_seconds=600)
    return {"Authorization": f"Bearer {token}"}


def _codes(crm: AsyncSandboxServer) -> dict[str, str]:
    module = crm.state()["accounts"]["acme"]["modules"]["vochi-telephony"]["module"]
    codes = module["integrations"]["telephony"]["additionalCodes"]
    return {str(c["userId"]): c["code"] for c in codes}


async def _extensions(db: asyncpg.Connection) -> Any:
    raw = await db.fetchval("SELECT integrations_config FROM enterprises WHERE number = '0367'")
    return json.loads(raw)["retailcrm"].get("user_extensions")


async def test_managers_lists_users_and_numbers_with_owners_and_saving_pushes_the_codes(
    svc: RunningService, db: asyncpg.Connection, crm: AsyncSandboxServer
) -> None:
    headers = _bearer(svc)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        listed = (await http.get("/retailcrm-admin/api/managers/0367", headers=headers)).json()
        saved = await http.put(
            "/retailcrm-admin/api/managers/0367",
            json={"user_extensions": {"19": "150", "20": None}},
            headers=headers,
        )
        moved = await http.put(
            "/retailcrm-admin/api/managers/0367",
            json={"user_extensions": {"20": "150"}},
            headers=headers,
        )
    assert [u["name"] for u in listed["users"]] == ["Петров Иван", "Сидорова Анна"]
    assert [n["label"] for n in listed["numbers"]] == ["150 — Кузнецова Ольга", "151"]
    assert saved.json()["pushed"] is True
    assert moved.json()["user_extensions"] == {"20": "150"}
    assert await _extensions(db) == {"20": "150"}
    assert _codes(crm) == {"20": "150"}


async def test_bad_assignments_get_422_and_change_nothing_here_or_in_retailcrm(
    svc: RunningService, db: asyncpg.Connection, crm: AsyncSandboxServer
) -> None:
    headers = _bearer(svc)
    bad = [
        {"user_extensions": {"19": "150", "20": "150"}},  # one number, two owners
        {"user_extensions": {"19": "999"}},  # not an internal number of the enterprise
        {"user_extensions": {"x": "150"}},
        {"user_extensions": {"19": "150"}, "extra": 1},
        {"user_extensions": ["150"]},
    ]
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        answers = [
            await http.put("/retailcrm-admin/api/managers/0367", json=body, headers=headers)
            for body in bad
        ]
        form = await http.put(
            "/retailcrm-admin/api/managers/0367",
            content=b"user_extensions=150",
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        )
    assert [a.status_code for a in answers] == [422] * len(bad)
    assert form.status_code == 415
    assert await _extensions(db) in (None, {})
    assert _codes(crm) == {}


async def test_a_refusal_by_retailcrm_keeps_the_saved_mapping_and_says_so(
    svc: RunningService, db: asyncpg.Connection, crm: AsyncSandboxServer
) -> None:
    crm.add_fault(endpoint="integration-modules/*", mode="error", status=500)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        saved = await http.put(
            "/retailcrm-admin/api/managers/0367",
            json={"user_extensions": {"19": "151"}},
            headers=_bearer(svc),
        )
    crm.clear_faults()
    assert saved.status_code == 200
    assert saved.json()["pushed"] is False
    assert saved.json()["retailcrm_error"]["status"] == 500
    assert await _extensions(db) == {"19": "151"}
    assert _codes(crm) == {}


async def test_journal_is_newest_first_in_keyset_pages_filtered_and_of_one_enterprise(
    svc: RunningService, db: asyncpg.Connection
) -> None:
    for i in range(5):
        await db.execute(
            """INSERT INTO integration_logs (enterprise_number, integration_type, event_type,
                   request_data, status, call_unique_id)
               VALUES ($1, 'retailcrm', $2, $3::jsonb, $4, $5)""",
            "0367" if i != 2 else "0400",
            "calls_upload" if i % 2 else "call_event",
            json.dumps({"body": {"phone": f"+37529000000{i}"}}),
            "error" if i == 3 else "success",
            f"call.{i}",
        )
    url = "/retailcrm-admin/api/journal/0367"
    headers = _bearer(svc)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        first = (await http.get(url, params={"limit": 2}, headers=headers)).json()
        second = (
            await http.get(
                url, params={"limit": 2, "before": first["next_before"]}, headers=headers
            )
        ).json()
        errors = (await http.get(url, params={"status": "error"}, headers=headers)).json()
        by_phone = (await http.get(url, params={"phone": "375290000004"}, headers=headers)).json()
        by_call = (await http.get(url, params={"call_id": "call.1"}, headers=headers)).json()
        future = (await http.get(url, params={"since": "2999-01-01"}, headers=headers)).json()
        invalid = await http.get(url, params={"since": "yesterday", "limit": "x"}, headers=headers)
        other = await http.get("/retailcrm-admin/api/journal/0400", headers=headers)
    calls = [r["call_unique_id"] for r in first["rows"] + second["rows"]]
    assert calls == ["call.4", "call.3", "call.1", "call.0"]
    assert second["next_before"] == second["rows"][-1]["id"]
    assert [r["call_unique_id"] for r in errors["rows"]] == ["call.3"]
    assert [r["call_unique_id"] for r in by_phone["rows"]] == ["call.4"]
    assert [r["call_unique_id"] for r in by_call["rows"]] == ["call.1"]
    assert future["rows"] == []
    assert invalid.status_code == 422
    assert set(invalid.json()["error"]["fields"]) == {"since", "limit"}
    assert other.status_code == 403


async def test_replay_takes_exactly_one_selection_and_diagnostics_show_no_secret(
    svc: RunningService, db: asyncpg.Connection
) -> None:
    headers = _bearer(svc)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        url = "/retailcrm-admin/api/replay/0367"
        none = await http.post(url, json={}, headers=headers)
        two = await http.post(url, json={"id": 1, "call_unique_id": "x.1"}, headers=headers)
        naive = await http.post(url, json={"since": "2025-01-01T00:00:00"}, headers=headers)
        ok = await http.post(url, json={"since": "2025-01-01T00:00:00+00:00"}, headers=headers)
        diagnostics = await http.get("/retailcrm-admin/api/diagnostics/0367", headers=headers)
        client_id = json.loads(
            await db.fetchval("SELECT integrations_config FROM enterprises WHERE number = '0367'")
        )["retailcrm"]["clientId"]
    assert [none.status_code, two.status_code, naive.status_code] == [422, 422, 422]
    assert ok.json() == {"enterprise_number": "0367", "replayed": 0, "leased": 0}
    body = diagnostics.text
    assert diagnostics.status_code == 200
    assert diagnostics.json()["pacing"]["api_key"] == "***" + KEY[-4:]
    assert diagnostics.json()["last_test"] is None
    assert KEY not in body
    assert client_id not in body


async def test_retailcrm_codes_are_offered_for_import_and_differences_are_listed(
    svc: RunningService, db: asyncpg.Connection, crm: AsyncSandboxServer
) -> None:
    headers = _bearer(svc)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        await http.put(
            "/retailcrm-admin/api/managers/0367",
            json={"user_extensions": {"19": "150"}},
            headers=headers,
        )
        # The local mapping is lost (a first visit after RetailCRM was set up elsewhere).
        await db.execute(
            """UPDATE enterprises SET integrations_config = jsonb_set(integrations_config,
                   '{retailcrm,user_extensions}', '{}') WHERE number = '0367'"""
        )
        empty = (await http.get("/retailcrm-admin/api/managers/0367", headers=headers)).json()
        await db.execute(
            """UPDATE enterprises SET integrations_config = jsonb_set(integrations_config,
                   '{retailcrm,user_extensions}', '{"20": "151"}') WHERE number = '0367'"""
        )
        differing = (await http.get("/retailcrm-admin/api/managers/0367", headers=headers)).json()
    assert empty["import_offered"] is True
    assert empty["remote"]["codes"] == {"19": "150"}
    assert differing["import_offered"] is False
    assert differing["differences"] == [
        {"user_id": "19", "local": None, "remote": "150"},
        {"user_id": "20", "local": "151", "remote": None},
    ]
