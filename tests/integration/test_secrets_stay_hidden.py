"""The journal survives hostile strings, and secrets stay out of errors, logs and rows."""

from __future__ import annotations

import json
import logging
from typing import Any

import asyncpg
import httpx
import pytest

from retailcrm_service.sandbox import AsyncSandboxServer
from retailcrm_service.storage.journal import IntegrationLogWriter, pg_sink
from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings

KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"
REMOTE = {"X-Real-IP": "203.0.113.9"}


async def test_one_hostile_row_does_not_lose_a_batch_of_other_enterprises_journal_rows(
    database_url: str, db: asyncpg.Connection
) -> None:
    """jsonb refuses NUL, lone surrogates and NaN; text refuses NUL. Before the fix one such
    row failed the whole batch insert and every row in it (any enterprise's) was lost."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with IntegrationLogWriter(sink=pg_sink(pool), retry_delay=0.01) as writer:
            writer.write("0400", "call_event", request_data={"ok": 1}, response_data=None,
                         status="success")  # fmt: skip
            writer.write(
                "0367",
                "smart_redirect",
                request_data={"phone": "+375\x00291234567", "\x00key": "\ud800", "n": float("nan")},
                response_data={"inf": float("inf"), "list": ["\ud83d", "ok\x00"]},
                status="error",
                error_message="boom\x00\ud800",
            )
            writer.write("0400", "call_event", request_data={"ok": 2}, response_data=None,
                         status="success")  # fmt: skip
            await writer.flush()
            stats = writer.stats()
    finally:
        await pool.close()
    rows = await db.fetch(
        "SELECT enterprise_number, request_data, response_data, error_message"
        " FROM integration_logs ORDER BY id"
    )
    assert stats["lost"] == 0
    assert [r["enterprise_number"] for r in rows] == ["0400", "0367", "0400"]
    hostile = json.loads(rows[1]["request_data"])
    assert hostile["phone"] == "+375\ufffd291234567"
    assert hostile["n"] == "nan"
    assert json.loads(rows[1]["response_data"])["inf"] == "inf"
    assert "\x00" not in rows[1]["error_message"]


async def test_a_hostile_phone_through_smart_redirect_is_journaled_not_lost(
    database_url: str, db: asyncpg.Connection
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": {"enabled": False}})
    parts = {"smart_redirect"}
    async with (
        running_service(service_settings(database_url), parts=parts) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
    ):
        reply = await http.post(
            "/api/smart-redirect",
            content=b'{"enterprise_number": "0367", "phone": "+375\\u0000291234567"}',
            headers={"content-type": "application/json"},
        )
        await svc.runtime.logs.flush()
        stats = svc.runtime.logs.stats()
    assert reply.status_code == 200
    assert reply.json()["source"] == "disabled"
    assert stats["lost"] == 0
    phones = await db.fetch(
        "SELECT request_data->>'phone' AS phone FROM integration_logs WHERE event_type = $1",
        "smart_redirect",
    )
    assert [r["phone"] for r in phones] == ["+375\ufffd291234567"]


INVALID_KEY_BODIES: list[dict[str, Any]] = [
    {"domain": "http://127.0.0.1:9", "api_key": KEY + "!"},
    {"domain": "http://127.0.0.1:9", "api_key": KEY + "\n" + KEY},
    {"domain": "http://127.0.0.1:9", "api_key": [KEY]},
    {"domain": "http://127.0.0.1:9", "api_key": {"value": KEY}},
    {"domain": "http://127.0.0.1:9", "apiKey": KEY},
    {"domain": KEY, "api_key": KEY},
    {"domain": f"https://{KEY}@acme.retailcrm.ru", "api_key": KEY},
    {"domain": f"https://acme.retailcrm.ru/?apiKey={KEY}", "api_key": KEY},
]


async def test_errors_about_a_bad_key_or_domain_never_echo_the_key(
    database_url: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await create_enterprise(db, "0367")
    async with (
        running_service(service_settings(database_url)) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
    ):
        replies = []
        for body in INVALID_KEY_BODIES:
            replies.append(await http.put("/api/config/0367", json=body))
            replies.append(await http.post("/api/config/0367/test", json=body))
    for reply in replies:
        assert reply.status_code == 422, reply.text
        assert KEY not in reply.text
    assert all(KEY not in r.getMessage() for r in caplog.records)
    assert await db.fetchval("SELECT integrations_config::text FROM enterprises") == "{}"


async def test_the_account_url_login_token_is_masked_in_journal_and_logs(
    database_url: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """accountUrl carries a year-long admin login token: only RetailCRM may hold it in full."""
    caplog.set_level(logging.DEBUG)
    await create_enterprise(db, "0367")
    async with AsyncSandboxServer(rate_limit=False, demo_data=False) as crm:
        settings = service_settings(database_url)
        async with (
            running_service(settings) as svc,
            httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
        ):
            body = {"domain": crm.url, "api_key": crm.api_key}
            seen = [await http.put("/api/config/0367", json=body)]
            seen.append(await http.post("/retailcrm-admin/api/register/0367"))
            seen.append(await http.get("/stats"))
            seen.append(await http.get("/metrics"))
            seen.append(await http.get("/health"))
            await svc.runtime.logs.flush()
        account_url = (
            crm.sandbox.state.account(None).modules[settings.module_code].data["accountUrl"]
        )
        sandbox_view = json.dumps(crm.state())
    token = account_url.split("token=", 1)[1]
    assert len(token) > 100  # a JWT
    rows = json.dumps(
        [dict(r) for r in await db.fetch("SELECT * FROM integration_logs")], default=str
    )
    assert "register_module" in rows
    assert "token=***" in rows
    for text in (rows, sandbox_view, *(r.text for r in seen)):
        assert token not in text
    assert all(token not in r.getMessage() for r in caplog.records)


async def test_the_saved_key_is_never_sent_to_a_domain_the_tester_chooses(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Testing another domain needs the key in the body: the saved key (never shown in full)
    must not be sent to an account or local port an admin session picks."""
    await create_enterprise(db, "0367")
    async with (
        AsyncSandboxServer(rate_limit=False, demo_data=False) as saved,
        AsyncSandboxServer(rate_limit=False, demo_data=False) as chosen,
    ):
        settings = service_settings(database_url)
        async with (
            running_service(settings) as svc,
            httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
        ):
            body = {"domain": saved.url, "api_key": saved.api_key}
            assert (await http.put("/api/config/0367", json=body)).status_code == 200
            elsewhere = await http.post("/api/config/0367/test", json={"domain": chosen.url})
            same = await http.post("/api/config/0367/test", json={"domain": saved.url})
            with_key = await http.post(
                "/api/config/0367/test", json={"domain": chosen.url, "api_key": chosen.api_key}
            )
        reached_chosen = chosen.state()["requests"]
    assert elsewhere.status_code == 422
    assert "api_key" in elsewhere.json()["error"]["fields"]
    assert same.status_code == 200
    assert same.json()["ok"] is True
    assert with_key.status_code == 200
    assert with_key.json()["ok"] is True
    # Only the request that carried its own key reached the chosen account.
    assert [r["auth"]["key"] for r in reached_chosen] == ["***" + chosen.api_key[-4:]]


async def test_a_new_domain_cannot_be_saved_without_giving_the_key_again(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Else a save of domain=<chosen> keeping the stored key, then a test, sends the key there."""
    await create_enterprise(db, "0367")
    async with (
        AsyncSandboxServer(rate_limit=False, demo_data=False) as saved,
        AsyncSandboxServer(rate_limit=False, demo_data=False) as chosen,
    ):
        async with (
            running_service(service_settings(database_url)) as svc,
            httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
        ):
            body = {"domain": saved.url, "api_key": saved.api_key}
            assert (await http.put("/api/config/0367", json=body)).status_code == 200
            before = await db.fetchval("SELECT integrations_config::text FROM enterprises")
            moved = await http.put("/api/config/0367", json={"domain": chosen.url})
            masked = await http.put(
                "/api/config/0367", json={"domain": chosen.url, "api_key": "***" + KEY[-4:]}
            )
            after = await db.fetchval("SELECT integrations_config::text FROM enterprises")
            tested = await http.post("/api/config/0367/test")
            kept = await http.put(
                "/api/config/0367", json={"domain": saved.url + "/", "enabled": False}
            )
        reached_chosen = chosen.state()["requests"]
    for refused in (moved, masked):
        assert refused.status_code == 422
        assert "api_key" in refused.json()["error"]["fields"]
    assert after == before
    assert tested.json()["ok"] is True
    assert kept.status_code == 200  # the same domain (trailing slash) keeps the stored key
    assert reached_chosen == []
