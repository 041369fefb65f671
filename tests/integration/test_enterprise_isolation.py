"""One enterprise's admin, module clientId or dialplan host never reaches another's data."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from retailcrm_service.sandbox import AsyncSandboxServer
from retailcrm_service.security import admin_auth as auth
from tests.integration.test_smart_redirect import (
    CUSTOMER,
    MANAGER,
    PHONE,
    TRUNK,
    account,
    add_enterprise,
)
from tests.support.pg import create_enterprise
from tests.support.service import RunningService, running_service, service_settings

KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"
BODY = {"domain": "http://127.0.0.1:9", "api_key": KEY}  # a closed port: nothing leaves
REMOTE = {"X-Real-IP": "203.0.113.9"}  # what nginx sets for a caller on the internet
OWN_HOST = "198.51.100.20"  # an enterprise's own Asterisk host (enterprises.ip)
A, B = "0367", "0400"


@pytest.fixture
async def svc(db: asyncpg.Connection, database_url: str) -> AsyncIterator[RunningService]:
    await create_enterprise(db, A)
    await create_enterprise(db, B)
    async with running_service(service_settings(database_url)) as service:
        async with httpx.AsyncClient(base_url=service.url) as http:
            for number in (A, B):
                assert (await http.put(f"/api/config/{number}", json=BODY)).status_code == 200
        yield service


async def _state_of(db: asyncpg.Connection, number: str) -> tuple[Any, ...]:
    config = await db.fetchval(
        "SELECT integrations_config::text FROM enterprises WHERE number = $1", number
    )
    version = await auth.current_version(db, number)
    statuses = await db.fetchval(
        "SELECT count(*) FROM retailcrm_user_status WHERE enterprise_number = $1", number
    )
    logs = await db.fetchval(
        "SELECT count(*) FROM integration_logs WHERE enterprise_number = $1", number
    )
    return config, version, statuses, logs


def _session(svc: RunningService, number: str, kind: str = "session") -> str:
    return auth.issue_token(svc.runtime.settings, number, version=0, kind=kind, ttl_seconds=600)


def _admin_calls(number: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", f"/retailcrm-admin/api/config/{number}", None),
        ("PUT", f"/retailcrm-admin/api/config/{number}", {**BODY, "enabled": False}),
        ("POST", f"/retailcrm-admin/api/config/{number}/test", {}),
        ("DELETE", f"/retailcrm-admin/api/config/{number}", None),
        ("POST", f"/retailcrm-admin/api/register/{number}", None),
        ("GET", f"/retailcrm-admin/{number}/", None),
        ("GET", f"/api/config/{number}", None),
        ("PUT", f"/api/config/{number}", {**BODY, "enabled": False}),
        ("POST", f"/api/config/{number}/test", {}),
        ("DELETE", f"/api/config/{number}", None),
    ]


async def test_an_admin_of_one_enterprise_gets_403_on_every_route_of_another(
    db: asyncpg.Connection, svc: RunningService
) -> None:
    """Bearer or cookie, through nginx (remote) or on loopback: 403, and B is untouched."""
    token = _session(svc, A)
    before = await _state_of(db, B)
    credentials = [
        {**REMOTE, "Authorization": f"Bearer {token}"},
        {**REMOTE, "Cookie": f"{auth.SESSION_COOKIE}={token}"},
        {"Authorization": f"Bearer {token}"},  # loopback + a token: the token decides
        {"Cookie": f"{auth.SESSION_COOKIE}={token}"},
    ]
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        for headers in credentials:
            for method, path, body in _admin_calls(B):
                response = await http.request(method, path, json=body, headers=headers)
                assert response.status_code == 403, (method, path, headers, response.text)
                assert response.json()["error"]["code"] == "forbidden"
        own = await http.get(f"/retailcrm-admin/api/config/{A}", headers=credentials[0])
    await svc.runtime.logs.flush()
    assert own.status_code == 200  # the same token is good for its own enterprise
    assert await _state_of(db, B) == before


async def test_internal_routes_refuse_remote_callers_even_with_an_admin_token(
    db: asyncpg.Connection, svc: RunningService
) -> None:
    before = await _state_of(db, B)
    token = _session(svc, A)
    calls = [
        ("POST", f"/api/config-cache/refresh/{B}", None),
        ("POST", "/api/config-cache/refresh-all", None),
        ("GET", "/api/config-cache/active-enterprises", None),
        ("GET", f"/api/user-status/{B}", None),
        ("GET", "/stats", None),
        ("GET", "/api/stats", None),
        ("GET", "/metrics", None),
        ("GET", "/api/metrics", None),
        ("POST", "/api/smart-redirect", {"enterprise_number": B, "phone": PHONE}),
        ("POST", "/api/events", {"enterprise_number": B, "event_type": "dial"}),
        ("POST", "/api/events/replay", {"enterprise_number": B}),
    ]
    spoofs = [
        {**REMOTE, "Authorization": f"Bearer {token}"},
        REMOTE,
        # A second X-Real-IP or an X-Forwarded-For of loopback does not make a remote internal.
        {**REMOTE, "X-Forwarded-For": "127.0.0.1"},
        {"X-Real-IP": "203.0.113.9, 127.0.0.1"},
        {"X-Real-IP": "localhost"},
        {**REMOTE, "X-Internal-Token": "guess"},
    ]
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        for headers in spoofs:
            for method, path, body in calls:
                response = await http.request(method, path, json=body, headers=headers)
                assert response.status_code == 403, (method, path, headers, response.text)
    assert await _state_of(db, B) == before


async def test_other_token_kinds_do_not_open_an_admin_session(svc: RunningService) -> None:
    """A login link or the module's account token is not a session; a session is no link."""
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        for kind in ("login", "account"):
            bearer = {**REMOTE, "Authorization": f"Bearer {_session(svc, A, kind)}"}
            response = await http.get(f"/retailcrm-admin/api/config/{A}", headers=bearer)
            assert response.status_code == 401
        link = await http.get(
            "/retailcrm-admin/login", params={"token": _session(svc, A)}, headers=REMOTE
        )
    assert link.status_code == 401
    assert "set-cookie" not in link.headers


async def test_a_modules_client_id_acts_only_on_its_own_enterprise(
    db: asyncpg.Connection, svc: RunningService
) -> None:
    """Status callbacks and the accountUrl POST carry A's clientId: B is never touched."""
    raw = await db.fetchval("SELECT integrations_config FROM enterprises WHERE number = $1", A)
    client_id = json.loads(raw)["retailcrm"]["clientId"]
    before = await _state_of(db, B)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        status = await http.post(
            "/retailcrm/status",
            data={
                "clientId": client_id,
                "userId": "7",
                "status": "busy",
                "enterprise_number": B,
                "enterprise": B,
            },
            headers=REMOTE,
        )
        login = await http.post(
            "/retailcrm-admin/login", data={"clientId": client_id}, headers=REMOTE
        )
        cookie = {**REMOTE, "Cookie": login.headers["set-cookie"].split(";", 1)[0]}
        other = await http.get(f"/retailcrm-admin/api/config/{B}", headers=cookie)
        own = await http.get(f"/retailcrm-admin/api/config/{A}", headers=cookie)
    assert status.status_code == 200
    rows = await db.fetch("SELECT enterprise_number, status FROM retailcrm_user_status")
    assert [(r["enterprise_number"], r["status"]) for r in rows] == [(A, "busy")]
    assert login.status_code == 303
    assert login.headers["location"] == f"/retailcrm-admin/{A}/"
    assert other.status_code == 403
    assert own.status_code == 200
    assert await _state_of(db, B) == before


async def test_deleting_one_enterprise_revokes_only_its_own_admin_tokens(
    db: asyncpg.Connection, svc: RunningService
) -> None:
    token_b = {**REMOTE, "Authorization": f"Bearer {_session(svc, B)}"}
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        deleted = await http.delete(f"/api/config/{A}")
        still = await http.get(f"/retailcrm-admin/api/config/{B}", headers=token_b)
    assert deleted.status_code == 200
    assert still.status_code == 200
    assert still.json()["api_key"] == "***" + KEY[-4:]


async def test_a_remote_dialplan_host_cannot_use_another_enterprises_public_number_as_token(
    db: asyncpg.Connection, database_url: str
) -> None:
    """The enterprise number ("0400") is public and guessable: from a remote host it is no Token.

    Before the fix any caller that could reach getcustomerdata read B's customer names and
    routing by sending ``Token: 0400``. name2 and secret still work from anywhere; the bare
    number still works for internal (loopback) callers and from the enterprise's own host.
    """
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        # This test is about who may ask, not how fast: the longest deadline, so that a loaded
        # machine cannot turn an allowed answer into the fail-open empty one.
        row = await add_enterprise(
            db, B, crm, key, extensions={"7": "150"}, smart={"deadline_ms": 2000}
        )
        settings = service_settings(database_url)
        parts = {"smart_redirect"}
        async with (
            running_service(settings, parts=parts) as svc,
            httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
        ):

            async def ask(token: str, headers: dict[str, str]) -> httpx.Response:
                return await http.post(
                    "/api/callevent/getcustomerdata",
                    headers={"Token": token, **headers},
                    json={"UniqueId": "1764150000.101", "Phone": PHONE, "TrunkId": TRUNK},
                )

            by_number_remote = await ask(B, REMOTE)
            by_number_in_body = await http.post(
                "/api/callevent/getcustomerdata",
                headers=REMOTE,
                json={"Token": B, "Phone": PHONE, "TrunkId": TRUNK},
            )
            by_name2_remote = await ask(row["name2"], REMOTE)
            by_secret_remote = await ask(row["secret"], REMOTE)
            by_number_loopback = await ask(B, {})
            # Some dialplans send the number: the enterprise's own Asterisk host may.
            await db.execute("UPDATE enterprises SET ip = $1 WHERE number = $2", OWN_HOST, B)
            await http.post(f"/api/config-cache/refresh/{B}")
            by_number_from_own_host = await ask(B, {"X-Real-IP": OWN_HOST})
            by_number_from_elsewhere = await ask(B, REMOTE)
    for refused in (by_number_remote, by_number_in_body, by_number_from_elsewhere):
        assert refused.status_code == 401
        assert refused.text.startswith('{"Name":"","DialPlan":null,')
        assert "Petrov" not in refused.text
    for allowed in (by_name2_remote, by_secret_remote, by_number_loopback, by_number_from_own_host):
        assert allowed.status_code == 200
        assert "Petrov" in allowed.text


async def test_a_client_id_copied_onto_a_second_enterprise_identifies_neither(
    db: asyncpg.Connection, database_url: str
) -> None:
    """A config copied by hand (plain SQL) carries the same clientId: callbacks and the
    accountUrl login must not pick one of the two enterprises at random."""
    shared = secrets.token_urlsafe(32)
    own = secrets.token_urlsafe(32)
    for number, client_id in ((A, shared), (B, shared), ("0500", own)):
        config = {**BODY, "enabled": True, "clientId": client_id}
        await create_enterprise(db, number, integrations={"retailcrm": config})
    async with (
        running_service(service_settings(database_url)) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
    ):
        replies = {}
        for name, client_id in (("shared", shared), ("own", own)):
            status = await http.post(
                "/retailcrm/status",
                data={"clientId": client_id, "userId": "7", "status": "busy"},
                headers=REMOTE,
            )
            login = await http.post(
                "/retailcrm-admin/login", data={"clientId": client_id}, headers=REMOTE
            )
            replies[name] = (status.status_code, login.status_code)
    assert replies == {"shared": (401, 401), "own": (200, 303)}
    rows = await db.fetch("SELECT enterprise_number FROM retailcrm_user_status")
    assert [r["enterprise_number"] for r in rows] == ["0500"]
