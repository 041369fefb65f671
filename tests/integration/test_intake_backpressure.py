"""Intake under a slow database: a bounded queue answers 503 + Retry-After at once when full,
and every request is answered within the commit deadline, which is shorter than the call
services' attempt timeout, so a client never gives up on an attempt the service still works on
(its retry never runs beside the original)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from retailcrm_service.pipeline.outbox import OutboxConfig
from retailcrm_service.settings import PipelineSettings
from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings
from vochi_crm_client import DispatchConfig

CONFIG = {"enabled": True, "domain": "http://127.0.0.1:9", "api_key": "k" * 20}
ATTEMPT_TIMEOUT = DispatchConfig().attempt_timeout


def _events(prefix: str, n: int) -> dict[str, Any]:
    return {
        "events": [
            {
                "enterprise_number": "0367",
                "event_type": "hangup",
                "call_unique_id": f"{prefix}.{i}",
                "payload": {"Phone": "+375291234567"},
            }
            for i in range(n)
        ]
    }


async def _stored(db: asyncpg.Connection, prefix: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM retailcrm_outbox WHERE call_unique_id LIKE $1", prefix + ".%"
        )
    )


async def _wait_for_lock_waiters(db: asyncpg.Connection, n: int) -> None:
    """Until ``n`` statements of the service wait for the test's table lock."""
    for _ in range(500):
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%INSERT INTO retailcrm_outbox%'"
        )
        if waiting >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the service's INSERT never waited for the lock")


@pytest.fixture
async def locker(database_url: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A second connection that can hold the outbox table locked (a stalled database)."""
    await create_enterprise(db, "0367", integrations={"retailcrm": CONFIG})
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


def test_the_commit_deadline_is_shorter_than_the_call_services_attempt_timeout() -> None:
    # Room is left for the request's transfer and parsing on top of the commit deadline.
    assert OutboxConfig().commit_timeout <= 0.8 * ATTEMPT_TIMEOUT


async def test_requests_behind_a_stalled_commit_are_answered_before_the_client_gives_up(
    database_url: str, db: asyncpg.Connection, locker: asyncpg.Connection
) -> None:
    settings = service_settings(database_url)  # production intake defaults
    async with (
        running_service(settings, parts={"events"}) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=ATTEMPT_TIMEOUT) as http,
    ):
        async with locker.transaction():
            await locker.execute("LOCK TABLE retailcrm_outbox IN ACCESS EXCLUSIVE MODE")
            first = asyncio.create_task(http.post("/api/events", json=_events("a", 3)))
            await _wait_for_lock_waiters(db, 1)
            # Queued behind the stalled commit: it is owed an answer by its own deadline.
            second = await http.post("/api/events", json=_events("b", 3))
            first_reply = await first
        for reply in (first_reply, second):
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "unavailable"
            assert int(reply.headers["retry-after"]) >= 1
        # Nothing of a 503 is stored; the retry is stored once.
        assert await _stored(db, "a") == 0
        assert await _stored(db, "b") == 0
        retry = await http.post("/api/events", json=_events("b", 3))
        assert retry.status_code == 202
        assert retry.json()["accepted"] == 3
        assert await _stored(db, "b") == 3


async def test_a_full_intake_queue_answers_503_with_retry_after_at_once(
    database_url: str, db: asyncpg.Connection, locker: asyncpg.Connection
) -> None:
    outbox = OutboxConfig(max_queued_events=10, commit_timeout=30.0)
    settings = service_settings(database_url, pipeline=PipelineSettings(outbox=outbox))
    async with (
        running_service(settings, parts={"events"}) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=60) as http,
    ):
        async with locker.transaction():
            await locker.execute("LOCK TABLE retailcrm_outbox IN ACCESS EXCLUSIVE MODE")
            committing = asyncio.create_task(http.post("/api/events", json=_events("a", 4)))
            await _wait_for_lock_waiters(db, 1)
            queued = asyncio.create_task(http.post("/api/events", json=_events("b", 8)))
            while svc.runtime.need_events().stats()["intake"]["queued_events"] < 8:
                await asyncio.sleep(0.01)
            # 8 events wait and 4 more would pass the bound of 10: refused while the others wait.
            refused = await http.post("/api/events", json=_events("c", 4))
            assert not committing.done()
            assert not queued.done()
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded"
            assert int(refused.headers["retry-after"]) >= 1
            # A request that fits in the bound is still queued.
            fits = asyncio.create_task(http.post("/api/events", json=_events("d", 2)))
            while svc.runtime.need_events().stats()["intake"]["queued_events"] < 10:
                await asyncio.sleep(0.01)
        replies = await asyncio.gather(committing, queued, fits)
        assert [r.status_code for r in replies] == [202, 202, 202]
        assert svc.runtime.need_events().stats()["intake"]["refused_full"] == 1
    assert [await _stored(db, p) for p in "abcd"] == [4, 8, 0, 2]
