"""Admin auth through the running service: login links, sessions, forged tokens, revocation."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import httpx
import jwt
import pytest

from retailcrm_service import cli
from retailcrm_service.security import admin_auth as auth
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings
from tests.support.pg import create_enterprise
from tests.support.service import RunningService, running_service, service_settings

KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"
REMOTE = {"X-Real-IP": "203.0.113.9"}  # what nginx sets for a browser on the internet
# A closed loopback port: deletes try RetailCRM and fail fast, never leaving the machine.
BODY = {"domain": "http://127.0.0.1:9", "api_key": KEY}


@pytest.fixture
async def svc(db: asyncpg.Connection, database_url: str) -> AsyncIterator[RunningService]:
    await create_enterprise(db, "0367")
    await create_enterprise(db, "0400")
    async with running_service(service_settings(database_url)) as service:
        async with httpx.AsyncClient(base_url=service.url) as http:
            for number in ("0367", "0400"):
                assert (await http.put(f"/api/config/{number}", json=BODY)).status_code == 200
        yield service


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _session(svc: RunningService, number: str, *, version: int = 0, **kw: object) -> str:
    settings = svc.runtime.settings
    return auth.issue_token(settings, number, version=version, ttl_seconds=600, **kw)  # type: ignore[arg-type]


def _bearer(token: str) -> dict[str, str]:
    return {**REMOTE, "Authorization": f"Bearer {token}"}


async def test_one_time_link_becomes_an_httponly_cookie_and_a_clean_url(
    svc: RunningService,
) -> None:
    link = auth.admin_link(svc.runtime.settings, "0367", version=0, ttl_seconds=60)
    async with httpx.AsyncClient(base_url=svc.url) as http:
        login = await http.get(_path(link), headers=REMOTE)
        assert login.status_code == 303
        assert login.headers["location"] == "/retailcrm-admin/0367/"
        assert login.headers["cache-control"] == "no-store"
        assert login.headers["referrer-policy"] == "no-referrer"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "Path=/retailcrm-admin/" in cookie
        assert "SameSite=lax" in cookie or "samesite=lax" in cookie.lower()
        page = await http.get("/retailcrm-admin/0367/", headers=REMOTE)
        config = await http.get("/retailcrm-admin/api/config/0367", headers=REMOTE)
        other = await http.get("/retailcrm-admin/api/config/0400", headers=REMOTE)
        again = await http.get(_path(link), headers=REMOTE)
    assert page.status_code == 200
    assert config.status_code == 200
    assert config.json()["api_key"] == "***" + KEY[-4:]
    assert other.status_code == 403
    assert again.status_code == 401
    assert "already used" in again.json()["error"]["message"]


async def test_cli_token_command_prints_a_working_link(
    svc: RunningService,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = svc.runtime.settings
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("RETAILCRM_JWT_SECRET", settings.jwt_secret.get_secret_value())
    monkeypatch.setenv("RETAILCRM_PUBLIC_URL", "https://pbx.example.by")
    assert await asyncio.to_thread(cli.main, ["token", "0367", "--ttl", "120"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith("https://pbx.example.by/retailcrm-admin/login?token=")
    async with httpx.AsyncClient(base_url=svc.url) as http:
        login = await http.get(_path(link), headers=REMOTE)
    assert login.status_code == 303


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _claims(number: str, **over: object) -> dict:
    now = int(time.time())
    claims = {
        "iss": "retailcrm-service",
        "aud": "retailcrm-admin",
        "sub": number,
        "ver": 0,
        "typ": "session",
        "iat": now,
        "exp": now + 600,
        "jti": "x",
    }
    claims.update(over)
    return claims


async def test_forged_expired_none_and_wrong_secret_tokens_get_401_other_enterprise_403(
    svc: RunningService,
) -> None:
    secret = svc.runtime.settings.jwt_secret.get_secret_value()
    good = _session(svc, "0367")
    head, payload, sig = good.split(".")
    forged_payload = _b64(_claims("0400"))
    cases = {
        "tampered payload": f"{head}.{forged_payload}.{sig}",
        "tampered signature": f"{head}.{payload}.{sig[:-3]}AAA",
        "expired": jwt.encode(_claims("0367", iat=1, exp=2), secret, algorithm="HS256"),
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims('0367'))}.",
        "wrong secret": jwt.encode(_claims("0367"), "x" * 64, algorithm="HS256"),
        "login kind as session": _session(svc, "0367", kind="login"),
        "stale version": jwt.encode(_claims("0367", ver=-1), secret, algorithm="HS256"),
        "garbage": "not-a-jwt",
    }
    async with httpx.AsyncClient(base_url=svc.url) as http:
        assert (
            await http.get("/retailcrm-admin/api/config/0367", headers=_bearer(good))
        ).status_code == 200
        for name, token in cases.items():
            for path in ("/retailcrm-admin/api/config/0367", "/api/config/0367"):
                response = await http.get(path, headers=_bearer(token))
                assert response.status_code == 401, (name, path)
                assert response.json()["error"]["code"] == "unauthorized"
            cookie_try = await http.get(
                "/retailcrm-admin/api/config/0367",
                headers={**REMOTE, "Cookie": f"{auth.SESSION_COOKIE}={token}"},
            )
            assert cookie_try.status_code == 401, name
        other = _session(svc, "0400")
        for path in (
            "/retailcrm-admin/api/config/0367",
            "/api/config/0367",
            "/retailcrm-admin/api/register/0367",
        ):
            method = "POST" if "register" in path else "GET"
            response = await http.request(method, path, headers=_bearer(other))
            assert response.status_code == 403, path
        anonymous = await http.get("/retailcrm-admin/api/config/0367", headers=REMOTE)
        assert anonymous.status_code == 401


async def test_tokens_issued_before_a_delete_stop_working_after_it(
    svc: RunningService, db: asyncpg.Connection
) -> None:
    token = _session(svc, "0367")
    unused_link = auth.admin_link(svc.runtime.settings, "0367", version=0, ttl_seconds=60)
    account_link = auth.account_url(svc.runtime.settings, "0367", version=0)
    async with httpx.AsyncClient(base_url=svc.url) as http:
        assert (await http.get("/api/config/0367", headers=_bearer(token))).status_code == 200
        deleted = await http.delete("/api/config/0367", headers=_bearer(token))
        assert deleted.status_code == 200
        assert deleted.json()["admin_tokens_revoked"] is True
        after = await http.get("/retailcrm-admin/api/config/0367", headers=_bearer(token))
        link_after = await http.get(_path(unused_link), headers=REMOTE)
        account_after = await http.get(_path(account_link), headers=REMOTE)
        fresh = _session(svc, "0367", version=1)
        fresh_ok = await http.get("/retailcrm-admin/api/config/0367", headers=_bearer(fresh))
        untouched = await http.get(
            "/retailcrm-admin/api/config/0400", headers=_bearer(_session(svc, "0400"))
        )
    assert after.status_code == 401
    assert after.json()["error"]["message"] == "token revoked"
    assert link_after.status_code == 401
    assert account_after.status_code == 401
    assert fresh_ok.status_code == 200
    assert untouched.status_code == 200
    assert (
        await db.fetchval(
            "SELECT version FROM retailcrm_admin_token_versions WHERE enterprise_number = '0367'"
        )
        == 1
    )


async def test_account_url_and_client_id_post_open_a_session(
    svc: RunningService, db: asyncpg.Connection
) -> None:
    client_id = json.loads(
        await db.fetchval("SELECT integrations_config FROM enterprises WHERE number = '0367'")
    )["retailcrm"]["clientId"]
    account_link = auth.account_url(svc.runtime.settings, "0367", version=0)
    async with httpx.AsyncClient(base_url=svc.url) as http:
        first = await http.get(_path(account_link), headers=REMOTE)
        second = await http.get(_path(account_link), headers=REMOTE)
        posted = await http.post(
            "/retailcrm-admin/login", data={"clientId": client_id}, headers=REMOTE
        )
        wrong = await http.post(
            "/retailcrm-admin/login", data={"clientId": client_id[:-2]}, headers=REMOTE
        )
    assert first.status_code == second.status_code == 303  # reusable until revoked
    assert posted.status_code == 303
    assert posted.headers["location"] == "/retailcrm-admin/0367/"
    assert wrong.status_code == 401


async def test_internal_routes_need_loopback_or_the_internal_token(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367")
    settings: Settings = service_settings(
        database_url, internal_token=Secret("internal-" + "t" * 24)
    )
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as http:
        loopback = await http.get("/api/config-cache/active-enterprises")
        remote = await http.get("/api/config-cache/active-enterprises", headers=REMOTE)
        with_token = await http.get(
            "/api/config-cache/active-enterprises",
            headers={**REMOTE, "X-Internal-Token": "internal-" + "t" * 24},
        )
        wrong_token = await http.get(
            "/api/config-cache/active-enterprises",
            headers={**REMOTE, "X-Internal-Token": "internal-" + "t" * 23 + "u"},
        )
        stats_remote = await http.get("/stats", headers=REMOTE)
    assert loopback.status_code == 200
    assert remote.status_code == 403
    assert remote.json()["error"]["code"] == "forbidden"
    assert with_token.status_code == 200
    assert wrong_token.status_code == 403
    assert stats_remote.status_code == 403


async def test_the_admin_session_cookie_drives_the_whole_config_api(svc: RunningService) -> None:
    """The cookie is scoped to /retailcrm-admin/: the admin's API lives there too."""
    link = auth.admin_link(svc.runtime.settings, "0367", version=0, ttl_seconds=60)
    async with httpx.AsyncClient(base_url=svc.url) as http:
        login = await http.get(_path(link), headers=REMOTE)
        cookie = {**REMOTE, "Cookie": login.headers["set-cookie"].split(";", 1)[0]}
        me = await http.get("/retailcrm-admin/api/me", headers=cookie)
        no_csrf = await http.put(
            "/retailcrm-admin/api/config/0367", json={**BODY, "enabled": False}, headers=cookie
        )
        cookie = {**cookie, "X-CSRF-Token": me.json()["csrf_token"]}
        saved = await http.put(
            "/retailcrm-admin/api/config/0367", json={**BODY, "enabled": False}, headers=cookie
        )
        invalid = await http.put(
            "/retailcrm-admin/api/config/0367", json={**BODY, "timezone": "X/Y"}, headers=cookie
        )
        tested = await http.post(
            "/retailcrm-admin/api/config/0367/test",
            json={"domain": "http://127.0.0.1:9"},
            headers=cookie,
        )
        deleted = await http.delete("/retailcrm-admin/api/config/0367", headers=cookie)
        after = await http.get("/retailcrm-admin/api/me", headers=cookie)
    assert me.json()["enterprise_number"] == "0367"
    assert no_csrf.status_code == 403
    assert no_csrf.json()["error"]["code"] == "csrf"
    assert saved.status_code == 200
    assert saved.json()["enabled"] is False
    assert invalid.status_code == 422
    assert tested.status_code == 200
    assert tested.json()["ok"] is False
    assert tested.json()["error"]["kind"] == "unavailable"
    assert deleted.status_code == 200
    assert after.status_code == 401


async def test_logout_ends_the_session_on_the_server_and_idle_or_old_sessions_expire(
    svc: RunningService, db: asyncpg.Connection
) -> None:
    async def login() -> dict[str, str]:
        link = auth.admin_link(svc.runtime.settings, "0367", version=0, ttl_seconds=60)
        response = await http.get(_path(link), headers=REMOTE)
        return {**REMOTE, "Cookie": response.headers["set-cookie"].split(";", 1)[0]}

    async with httpx.AsyncClient(base_url=svc.url) as http:
        cookie = await login()
        csrf = (await http.get("/retailcrm-admin/api/me", headers=cookie)).json()["csrf_token"]
        refused = await http.post("/retailcrm-admin/logout", headers=cookie)
        still = await http.get("/retailcrm-admin/api/me", headers=cookie)
        out = await http.post("/retailcrm-admin/logout", headers={**cookie, "X-CSRF-Token": csrf})
        copied = await http.get("/retailcrm-admin/api/me", headers=cookie)

        idle, old = await login(), await login()
        await db.execute(
            """UPDATE retailcrm_admin_sessions SET last_seen_at = now() - interval '3 hours'
               WHERE revoked_at IS NULL AND id = (SELECT min(id) FROM retailcrm_admin_sessions
                                                  WHERE revoked_at IS NULL)"""
        )
        await db.execute(
            """UPDATE retailcrm_admin_sessions SET expires_at = now() - interval '1 second'
               WHERE revoked_at IS NULL AND last_seen_at > now() - interval '1 hour'"""
        )
        answers = [
            (await http.get("/retailcrm-admin/api/me", headers=h)).status_code for h in (idle, old)
        ]
    assert refused.status_code == 403
    assert still.status_code == 200
    assert out.status_code == 200
    assert "retailcrm_admin_session=" in out.headers["set-cookie"]
    assert copied.status_code == 401
    assert copied.json()["error"]["message"] == "session ended"
    assert answers == [401, 401]
