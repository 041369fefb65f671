"""After save, test, register and delete, the API key is nowhere: responses, HTML, logs, rows."""

from __future__ import annotations

import json
import logging

import asyncpg
import httpx
import pytest

from retailcrm_service.sandbox import AsyncSandboxServer
from retailcrm_service.security import admin_auth as auth
from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings

REMOTE = {"X-Real-IP": "203.0.113.9"}


def _dump(response: httpx.Response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    return f"{response.status_code}\n{headers}\n{response.text}"


async def test_api_key_never_leaves_the_service(
    db: asyncpg.Connection, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await create_enterprise(db, "0367")
    seen: list[str] = []
    async with AsyncSandboxServer(rate_limit=False, demo_data=False) as crm:
        key = crm.api_key
        settings = service_settings(database_url)
        async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as http:
            body = {"domain": crm.url, "api_key": key, "user_extensions": {"1": "150"}}
            seen.append(_dump(await http.put("/api/config/0367", json=body)))
            stored = await db.fetchval(
                "SELECT integrations_config FROM enterprises WHERE number = '0367'"
            )
            client_id = json.loads(stored)["retailcrm"]["clientId"]
            seen.append(_dump(await http.get("/api/config/0367")))
            seen.append(_dump(await http.post("/api/config/0367/test")))
            seen.append(_dump(await http.post("/api/config/0367/test", json={"api_key": key})))
            seen.append(_dump(await http.post("/retailcrm-admin/api/register/0367")))
            link = auth.admin_link(settings, "0367", version=0, ttl_seconds=60)
            login = await http.get(
                link.split("8019", 1)[-1].split("127.0.0.1", 1)[-1].removeprefix(":"),
                headers=REMOTE,
            )
            seen.append(_dump(login))
            cookie = {"Cookie": login.headers["set-cookie"].split(";", 1)[0], **REMOTE}
            seen.append(_dump(await http.get("/retailcrm-admin/", headers=REMOTE)))
            seen.append(_dump(await http.get("/retailcrm-admin/0367/", headers=cookie)))
            seen.append(_dump(await http.get("/retailcrm-admin/api/config/0367", headers=cookie)))
            seen.append(_dump(await http.get("/health")))
            seen.append(_dump(await http.get("/stats")))
            seen.append(_dump(await http.get("/metrics")))
            seen.append(_dump(await http.delete("/api/config/0367")))
            seen.append(_dump(await http.get("/api/config/0367")))
            seen.append(_dump(await http.get("/stats")))
            seen.append(_dump(await http.get("/metrics")))
            await svc.runtime.logs.flush()
    assert login.status_code == 303
    # The scenario really used the key: the test and the registration reached the sandbox.
    assert seen[2].startswith("200")
    assert '"ok":true' in seen[2]
    assert seen[4].startswith("200")
    assert '"registered":true' in seen[4]
    assert '"module_deactivated":true' in seen[12]
    rows = await db.fetch("SELECT * FROM integration_logs ORDER BY id")
    assert {r["event_type"] for r in rows} >= {
        "register_module",
        "delete_module",
        "test_connection",
    }
    row_text = json.dumps([dict(r) for r in rows], default=str)
    log_text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert len(caplog.records) > 10  # the capture works
    for secret in (
        key,
        settings.jwt_secret.get_secret_value(),
        settings.secret_key.get_secret_value(),
    ):
        for response in seen:
            assert secret not in response
        assert secret not in log_text
        assert secret not in row_text
    # The module's clientId (the callbacks' secret) is masked like a key.
    assert all(client_id not in response for response in seen)
    assert client_id not in row_text
    assert client_id not in log_text
