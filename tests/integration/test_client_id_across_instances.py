"""A clientId created through one service instance is recognised by every other instance at
once (the NOTIFY of the config change), not at their next full reload minutes later."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings

CONFIG = {"domain": "http://127.0.0.1:9", "api_key": "k" * 32, "enabled": True}


async def _status(http: httpx.AsyncClient, client_id: str) -> httpx.Response:
    return await http.post(
        "/retailcrm/status", data={"clientId": client_id, "userId": "7", "status": "busy"}
    )


async def test_a_client_id_saved_on_one_instance_is_known_to_another_without_a_reload(
    database_url: str, db: asyncpg.Connection
) -> None:
    # The enterprise has no RetailCRM config yet: no instance has it cached.
    await create_enterprise(db, "0367")
    settings = service_settings(database_url)
    async with (
        running_service(settings) as one,
        running_service(settings) as other,
        httpx.AsyncClient(base_url=one.url, timeout=10) as http_one,
        httpx.AsyncClient(base_url=other.url, timeout=10) as http_other,
    ):
        for service in (one, other):  # listening, and past the reload that follows connecting
            listener = service.runtime.listener
            assert listener is not None
            while listener.stats()["reloads"] < 1:
                await asyncio.sleep(0.02)
        reloads = other.runtime.configs.stats()["full_reloads"]
        saved = await http_one.put("/api/config/0367", json=CONFIG)
        assert saved.status_code == 200, saved.text
        client_id = await db.fetchval(
            "SELECT integrations_config -> 'retailcrm' ->> 'clientId' FROM enterprises "
            "WHERE number = '0367'"
        )
        assert client_id
        assert (await _status(http_one, client_id)).status_code == 200
        # Well within the 180-300 s full reload period: only the change notification can
        # tell the other instance about the new clientId.
        for _ in range(100):
            reply = await _status(http_other, client_id)
            if reply.status_code != 401:
                break
            await asyncio.sleep(0.1)
        assert reply.status_code == 200, reply.text
        assert other.runtime.configs.stats()["full_reloads"] == reloads
