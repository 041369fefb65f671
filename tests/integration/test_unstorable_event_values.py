"""POST /api/events rejects, per event, values PostgreSQL cannot store.

A payload holding a NUL character (text/jsonb refuse NUL) or a lone surrogate is rejected alone;
the good events of the same request are stored, so a retrying client never resends a poison
event forever.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings

CONFIG = {"enabled": True, "domain": "http://127.0.0.1:9", "api_key": "k" * 20}


def _event(unique_id: str, **payload: Any) -> dict[str, Any]:
    return {
        "enterprise_number": "0367",
        "event_type": "hangup",
        "call_unique_id": unique_id,
        "payload": {"Phone": "+375291234567", **payload},
    }


async def _post(database_url: str, body: bytes) -> httpx.Response:
    parts = {"events"}
    async with (
        running_service(service_settings(database_url), parts=parts) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=20) as http,
    ):
        return await http.post(
            "/api/events", content=body, headers={"content-type": "application/json"}
        )


async def test_a_lone_surrogate_in_one_event_rejects_only_that_event(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": CONFIG})
    good = json.dumps(_event("1.1"))
    body = f'{{"events": [{good}, {{"enterprise_number": "0367", "event_type": "hangup", '
    body += '"call_unique_id": "1.2", "payload": {"Phone": "\\ud800"}}]}'
    reply = await _post(database_url, body.encode())
    assert reply.status_code == 202
    assert reply.json()["accepted"] == 1
    assert [r["index"] for r in reply.json()["rejected"]] == [1]


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param('"payload": {"Phone": "\\u0000"}', id="nul-in-payload"),
        pytest.param('"payload": {"\\u0000": 1}', id="nul-in-key"),
    ],
)
async def test_a_nul_in_one_event_rejects_only_that_event(
    db: asyncpg.Connection, database_url: str, poison: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": CONFIG})
    good = json.dumps(_event("2.1"))
    body = f'{{"events": [{good}, {{"enterprise_number": "0367", "event_type": "hangup", '
    body += f'"call_unique_id": "2.2", {poison}}}]}}'
    reply = await _post(database_url, body.encode())
    assert reply.status_code == 202
    assert reply.json()["accepted"] == 1
    assert [r["index"] for r in reply.json()["rejected"]] == [1]
