"""Which commits wait for the disk: acknowledged events do; delivery's bookkeeping and the journal
do not (docs/architecture.md#durability)."""

from __future__ import annotations

import asyncpg

from tests.support.service import running_service, service_settings


async def _synchronous_commit(pool: asyncpg.Pool) -> str:
    async with pool.acquire() as conn:
        return str(await conn.fetchval("SHOW synchronous_commit"))


async def test_only_the_intake_commit_waits_for_the_wal_flush(database_url: str) -> None:
    async with running_service(service_settings(database_url), parts={"events"}) as svc:
        events = svc.runtime.need_events()
        assert events.delivery is not None
        intake_pool = events.committer._pool  # type: ignore[attr-defined]
        delivery_pool = events.delivery.store._pool
        assert intake_pool is svc.runtime.pool
        assert await _synchronous_commit(intake_pool) == "on"
        assert delivery_pool is not intake_pool
        assert await _synchronous_commit(delivery_pool) == "off"
