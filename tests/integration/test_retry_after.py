"""RetailCRM's ``Retry-After`` on a 503 is honoured within bounds: seconds or an HTTP-date, capped,
and a non-finite or non-numeric value falls back to the ordinary short retry (real PostgreSQL,
the sandbox answering the header)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import asyncpg
import pytest

from retailcrm_service.crm.client import RETRY_AFTER_CAP
from retailcrm_service.pipeline.delivery import DeliveryConfig, DeliveryService
from retailcrm_service.pipeline.outbox import GroupCommitter, OutboxConfig, StoredEvent
from retailcrm_service.sandbox import SandboxServer
from retailcrm_service.storage.enterprise_configs import load_config
from tests.support.pipeline import add_enterprise, prepare_sandbox
from vochi_crm_client import BackoffPolicy, idempotency_key

FALLBACK = 1.0  # DeliveryConfig.rate_limit_retry: the wait when the header says nothing usable


class Configs:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get(self, number: str) -> Any:
        return await load_config(self._pool, number, secret_key=None)


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


def _dial(uid: str) -> StoredEvent:
    payload = {"UniqueId": uid, "Phone": "+375291234567", "Extensions": ["150"], "CallType": 0}
    return StoredEvent(
        enterprise_number="0367",
        event_type="dial",
        call_unique_id=uid,
        payload=payload,
        origin="live",
        idempotency_key=idempotency_key("0367", uid, "dial", ["150"]),
    )


async def _first_wait(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer, retry_after: str
) -> float:
    """Deliver one popup against a 503 carrying ``retry_after``; the wait the outbox persisted
    after that first refusal, in seconds."""
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(
        endpoint="telephony/call/event", mode="error", status=503, retry_after=retry_after
    )
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2, rate_limit_retry=FALLBACK)
    outbox = OutboxConfig(retry=BackoffPolicy(base=0.05, cap=RETRY_AFTER_CAP), popup_ttl=3600)
    service = DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)
    async with service, GroupCommitter(pool=pool, config=outbox, on_commit=service.wake) as c:
        await c.submit([_dial("9.1")])
        deadline = time.monotonic() + 15
        while True:
            row = await db.fetchrow(
                "SELECT last_error, extract(epoch FROM due_at - now()) AS wait"
                " FROM retailcrm_outbox"
            )
            if row["last_error"] is not None:
                break
            assert time.monotonic() < deadline, "the refused attempt was never settled"
            await asyncio.sleep(0.05)
    assert "rate limited" in row["last_error"]
    return float(row["wait"])


@pytest.mark.parametrize("header", ["inf", "-inf", "nan", "1e12", "soon", "1.5"])
async def test_a_non_finite_or_non_numeric_retry_after_falls_back_to_the_short_retry(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer, header: str
) -> None:
    wait = await _first_wait(pool, db, crm, header)
    assert wait <= FALLBACK + 0.5


async def test_a_huge_retry_after_is_capped(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    wait = await _first_wait(pool, db, crm, "1000000000000")
    assert RETRY_AFTER_CAP - 30 <= wait <= RETRY_AFTER_CAP + 0.5


async def test_an_http_date_retry_after_is_honoured(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    wait = await _first_wait(pool, db, crm, format_datetime(when, usegmt=True))
    assert 60 <= wait <= 121


async def test_delta_seconds_are_honoured(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    wait = await _first_wait(pool, db, crm, "120")
    assert 60 <= wait <= 120.5
