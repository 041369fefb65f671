"""An API key this instance cannot decrypt (wrong or missing ``RETAILCRM_SECRET_KEY``): the
enterprise's events wait without spending attempts, nothing is settled as "off", ``/health`` says
degraded and why, and delivery resumes once the key can be read (real PostgreSQL, the sandbox)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from retailcrm_service.pipeline.delivery import DeliveryConfig, DeliveryService
from retailcrm_service.pipeline.outbox import GroupCommitter, StoredEvent
from retailcrm_service.sandbox import SandboxServer
from retailcrm_service.security.key_crypto import encrypt_api_key
from retailcrm_service.security.secrets import Secret
from retailcrm_service.storage.enterprise_configs import load_config
from tests.support.pipeline import add_enterprise, prepare_sandbox
from tests.support.service import running_service, service_settings
from vochi_crm_client import idempotency_key


class Configs:
    """The service's loader with a secret key the test can change."""

    def __init__(self, pool: asyncpg.Pool, secret_key: Secret | None) -> None:
        self._pool = pool
        self.secret_key = secret_key

    async def get(self, number: str) -> Any:
        return await load_config(self._pool, number, secret_key=self.secret_key)


@pytest.fixture
def crm() -> Iterator[SandboxServer]:
    with SandboxServer(rate_limit=False, demo_data=False) as server:
        prepare_sandbox(server.url, server.api_key)
        yield server


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


def _event(event_type: str, uid: str, origin: str = "live") -> StoredEvent:
    payload = {
        "UniqueId": uid,
        "Phone": "+375291234567",
        "Extensions": ["150"],
        "CallType": 0,
        "StartTime": "2025-11-26 10:00:00",
        "EndTime": "2025-11-26 10:01:00",
        "DateReceived": "2025-11-26 10:01:00",
        "CallStatus": "2",
    }
    exts = ["150"] if event_type == "dial" else []
    return StoredEvent(
        enterprise_number="0367",
        event_type=event_type,
        call_unique_id=uid,
        payload=payload,
        origin=origin,
        idempotency_key=idempotency_key("0367", uid, event_type, exts),
    )


async def _until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("instance_key", ["missing", "wrong"])
async def test_events_wait_while_the_key_is_unreadable_and_go_out_once_it_is_readable(
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    crm: SandboxServer,
    instance_key: str,
) -> None:
    right = Secret(secrets.token_urlsafe(32))
    stored = encrypt_api_key(crm.api_key, enterprise_number="0367", secret_key=right)
    await add_enterprise(db, crm.url, stored)
    configs = Configs(pool, None if instance_key == "missing" else Secret("not-the-key"))
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2, key_unreadable_retry=0.1)
    service = DeliveryService(pool=pool, configs=configs, config=config)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([_event("dial", "4.1"), _event("hangup", "4.2", origin="download")])

        async def waited_twice() -> bool:
            counters = service.stats()["enterprises"].get("0367", {})
            return counters.get("deferred", 0) >= 4

        await _until(waited_twice)
        rows = await db.fetch("SELECT state, attempts, last_error FROM retailcrm_outbox")
        assert [r["state"] for r in rows] == ["pending", "pending"]
        assert [r["attempts"] for r in rows] == [0, 0]
        assert all("RETAILCRM_SECRET_KEY" in r["last_error"] for r in rows)
        assert service.stats()["totals"]["skipped"] == 0
        account = crm.state()["accounts"]["test"]
        assert account["events"] == []
        assert account["calls"] == []

        configs.secret_key = right  # the operator fixes RETAILCRM_SECRET_KEY

        async def settled() -> bool:
            return not await db.fetchval(
                "SELECT count(*) FROM retailcrm_outbox WHERE state = 'pending'"
            )

        await _until(settled)
    states = await db.fetch("SELECT state FROM retailcrm_outbox ORDER BY id")
    assert [r["state"] for r in states] == ["delivered", "delivered"]
    account = crm.state()["accounts"]["test"]
    assert len(account["events"]) == 1
    assert [c["externalId"] for c in account["calls"]] == ["4.2"]


async def test_health_is_degraded_and_says_why_while_a_key_cannot_be_decrypted(
    db: asyncpg.Connection, database_url: str
) -> None:
    other = Secret(secrets.token_urlsafe(32))
    stored = encrypt_api_key("k" * 32, enterprise_number="0367", secret_key=other)
    await add_enterprise(db, "http://127.0.0.1:9", stored)
    settings = service_settings(database_url)  # its own random RETAILCRM_SECRET_KEY
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as http:
        await svc.runtime.listener.wait_listening()
        health = await http.get("/health")
        stats = await http.get("/stats")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded"
    assert any("RETAILCRM_SECRET_KEY" in reason for reason in body["reasons"])
    assert body["api_keys"] == {"ok": False, "unreadable": 1}
    assert stats.json()["config_cache"]["unreadable_keys"] == ["0367"]
    assert "k" * 32 not in health.text + stats.text
