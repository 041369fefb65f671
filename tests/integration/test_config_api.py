"""Config API and config cache on a real PostgreSQL through the running service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.support.pg import create_enterprise
from tests.support.service import RunningService, running_service, service_settings

KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"
GOOD = {"domain": "https://acme.retailcrm.ru", "api_key": KEY, "user_extensions": {"7": "150"}}


@pytest.fixture
async def svc(database_url: str) -> AsyncIterator[RunningService]:
    async with running_service(service_settings(database_url, allow_http=False)) as service:
        yield service


@pytest.fixture
async def http(svc: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
        yield client


async def _doc(db: asyncpg.Connection, number: str = "0367") -> dict:
    raw = await db.fetchval("SELECT integrations_config FROM enterprises WHERE number = $1", number)
    return json.loads(raw)


async def test_save_then_read_masks_the_key_and_encrypts_it_at_rest(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    await create_enterprise(db, "0367", integrations={"uon": True})
    put = await http.put("/api/config/0367", json=GOOD)
    got = await http.get("/api/config/0367")
    for response in (put, got):
        assert response.status_code == 200
        assert KEY not in response.text
        body = response.json()
        assert body["api_key"] == "***" + KEY[-4:]
        assert body["domain"] == "https://acme.retailcrm.ru"
        assert body["user_extensions"] == {"7": "150"}
        assert body["timezone"] == "Europe/Minsk"
    stored = (await _doc(db))["retailcrm"]
    assert stored["api_key"].startswith("enc:v1:")
    assert KEY not in json.dumps(stored)
    assert len(stored["clientId"]) >= 40
    assert (await _doc(db))["uon"] == {"enabled": True}


async def test_later_saves_keep_the_key_and_the_client_id(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    await create_enterprise(db, "0367")
    await http.put("/api/config/0367", json=GOOD)
    first = (await _doc(db))["retailcrm"]
    again = await http.put(
        "/api/config/0367",
        json={"domain": "https://acme.retailcrm.ru", "api_key": "***" + KEY[-4:], "enabled": False},
    )
    assert again.status_code == 200
    assert again.json()["enabled"] is False
    second = (await _doc(db))["retailcrm"]
    assert second["clientId"] == first["clientId"]
    assert second["api_key"] == first["api_key"]


INVALID = [
    ({"api_key": KEY}, "domain"),
    ({**GOOD, "domain": "http://acme.retailcrm.ru"}, "domain"),
    ({**GOOD, "domain": "https://evil.example.com"}, "domain"),
    ({**GOOD, "domain": "https://acme.retailcrm.ru/api/v5?x=1"}, "domain"),
    ({**GOOD, "domain": "https://user:pw@acme.retailcrm.ru"}, "domain"),
    ({**GOOD, "domain": "http://127.0.0.1:8090"}, "domain"),
    ({**GOOD, "api_key": "short"}, "api_key"),
    ({**GOOD, "api_key": "has spaces in it, not a key!!"}, "api_key"),
    ({**GOOD, "user_extensions": {"seven": "150"}}, "user_extensions"),
    ({**GOOD, "user_extensions": {"7": "1"}}, "user_extensions"),
    ({**GOOD, "user_extensions": {"7": "150", "8": "150"}}, "user_extensions"),
    ({**GOOD, "timezone": "Mars/Olympus"}, "timezone"),
    ({**GOOD, "enabled": "perhaps"}, "enabled"),
    ({**GOOD, "surprise": 1}, "surprise"),
    (
        {**GOOD, "external_phones": [{"siteCode": "main", "externalPhone": "abc"}]},
        "external_phones.0.externalPhone",
    ),
]


async def test_invalid_bodies_get_422_with_field_errors_and_change_nothing(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    await create_enterprise(db, "0367", integrations={"uon": True})
    before = await _doc(db)
    for body, field in INVALID:
        response = await http.put("/api/config/0367", json=body)
        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert field in error["fields"], (body, error)
        assert KEY not in response.text
    first_save_without_key = await http.put("/api/config/0367", json={"domain": GOOD["domain"]})
    assert first_save_without_key.status_code == 422
    assert "api_key" in first_save_without_key.json()["error"]["fields"]
    not_json = await http.put(
        "/api/config/0367", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_json"
    too_large = await http.put("/api/config/0367", content=b"[" + b"1," * 200_000 + b"1]")
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "too_large"
    not_object = await http.put("/api/config/0367", json=[GOOD])
    assert not_object.status_code == 422
    assert await _doc(db) == before


async def test_unknown_enterprise_is_404(http: httpx.AsyncClient) -> None:
    for response in (
        await http.get("/api/config/9999"),
        await http.put("/api/config/9999", json=GOOD),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


async def test_loopback_http_domain_only_with_allow_http(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367")
    settings = service_settings(database_url, allow_http=True)
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as http:
        ok = await http.put("/api/config/0367", json={**GOOD, "domain": "http://127.0.0.1:8090/"})
        bad = await http.put("/api/config/0367", json={**GOOD, "domain": "http://10.0.0.1:8090"})
    assert ok.status_code == 200
    assert ok.json()["domain"] == "http://127.0.0.1:8090"
    assert bad.status_code == 422


async def test_api_saves_racing_plain_sql_updates_of_other_keys_lose_nothing(
    db: asyncpg.Connection, database_url: str, http: httpx.AsyncClient
) -> None:
    """Concurrent writers: our saves touch only `retailcrm`; others' keys all survive."""
    await create_enterprise(db, "0367", integrations={"uon": {"enabled": True}})
    assert (await http.put("/api/config/0367", json=GOOD)).status_code == 200
    client_id = (await _doc(db))["retailcrm"]["clientId"]
    rounds = 30
    pool = await asyncpg.create_pool(database_url, min_size=4, max_size=8)

    async def plain_sql(i: int) -> None:
        await pool.execute(
            """UPDATE enterprises SET integrations_config =
                   jsonb_set(integrations_config, ARRAY['uon', 'k' || $1::text], 'true'::jsonb)
               WHERE number = '0367'""",
            str(i),
        )
        await pool.execute(
            """UPDATE enterprises SET integrations_config = jsonb_set(integrations_config,
                   '{retailcrm,last_sync}', to_jsonb($1::text)) WHERE number = '0367'""",
            f"sync-{i}",
        )

    async def api_save(i: int) -> int:
        body = {**GOOD, "user_extensions": {str(i): f"{100 + i}"}}
        return (await http.put("/api/config/0367", json=body)).status_code

    try:
        results = await asyncio.gather(
            *(plain_sql(i) for i in range(rounds)), *(api_save(i) for i in range(rounds))
        )
    finally:
        await pool.close()
    assert all(status == 200 for status in results[rounds:])
    doc = await _doc(db)
    assert {f"k{i}" for i in range(rounds)} <= set(doc["uon"])
    assert doc["uon"]["enabled"] is True
    ours = doc["retailcrm"]
    assert ours["clientId"] == client_id
    assert ours["last_sync"].startswith("sync-")
    ((user_id, ext),) = ours["user_extensions"].items()
    assert ext == f"{100 + int(user_id)}"
    assert ours["domain"] == GOOD["domain"]
    assert ours["api_key"].startswith("enc:v1:")


async def test_plain_sql_change_reaches_the_cache_through_notify(
    db: asyncpg.Connection, svc: RunningService, http: httpx.AsyncClient
) -> None:
    await create_enterprise(db, "0367")
    await http.put("/api/config/0367", json=GOOD)
    configs = svc.runtime.configs
    assert (await configs.get("0367")).is_on
    await db.execute(
        """UPDATE enterprises SET integrations_config =
               jsonb_set(integrations_config, '{retailcrm,enabled}', 'false')
           WHERE number = '0367'"""
    )

    async def off() -> bool:
        config = await configs.get("0367")
        return config is not None and not config.enabled

    deadline = asyncio.get_running_loop().time() + 10
    while not await off() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert await off()
    listed = await http.get("/api/config-cache/active-enterprises")
    assert listed.json()["enterprises"] == []


async def test_cache_endpoints_refresh_and_list(
    db: asyncpg.Connection, svc: RunningService, http: httpx.AsyncClient
) -> None:
    await create_enterprise(db, "0367")
    await create_enterprise(db, "0400")
    await http.put("/api/config/0367", json=GOOD)
    await http.put("/api/config/0400", json={**GOOD, "enabled": False})
    one = await http.post("/api/config-cache/refresh/0367")
    assert one.json() == {
        "enterprise_number": "0367",
        "exists": True,
        "configured": True,
        "is_on": True,
    }
    every = await http.post("/api/config-cache/refresh-all")
    assert every.status_code == 200
    assert every.json()["enterprises"] == 2
    listed = await http.get("/api/config-cache/active-enterprises")
    assert listed.json() == {"enterprises": ["0367"], "count": 1}
    missing = await http.post("/api/config-cache/refresh/9999")
    assert missing.json()["exists"] is False


async def test_client_id_lookup_is_exact(
    db: asyncpg.Connection, svc: RunningService, http: httpx.AsyncClient
) -> None:
    await create_enterprise(db, "0367")
    await http.put("/api/config/0367", json=GOOD)
    client_id = (await _doc(db))["retailcrm"]["clientId"]
    configs = svc.runtime.configs
    found = await configs.find_by_client_id(client_id)
    assert found is not None
    assert found.enterprise_number == "0367"
    assert await configs.find_by_client_id(client_id[:-1]) is None
    assert await configs.find_by_client_id("") is None


async def test_remote_callers_without_the_internal_token_are_refused(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    await create_enterprise(db, "0367")
    remote = {"X-Real-IP": "203.0.113.9"}
    assert (
        await http.get("/api/config-cache/active-enterprises", headers=remote)
    ).status_code == 403
    assert (await http.put("/api/config/0367", json=GOOD, headers=remote)).status_code == 401
    assert (await http.get("/api/config/0367", headers=remote)).status_code == 401
