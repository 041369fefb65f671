"""ChangeListener on a real PostgreSQL: delivery, debounced reloads, reconnects, heartbeats."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg

from retailcrm_service.storage.database import with_database
from tests.support.pg import EmbeddedPostgres, create_enterprise
from vochi_crm_client import BackoffPolicy, Change, ChangeListener, ListenerSettings

SETTINGS = ListenerSettings(
    heartbeat_interval=0.1,
    heartbeat_timeout=2.0,
    connect_timeout=2.0,
    reconnect=BackoffPolicy(base=0.05, cap=0.2),
    reload_retry=BackoffPolicy(base=0.05, cap=0.1),
)


async def eventually(check: Callable[[], bool], *, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.01)


class Recorder:
    """on_change / on_reload callbacks that record what they were given."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.reloads = 0
        self.gate: asyncio.Event | None = None
        self.failures_left = 0
        self.reloading = asyncio.Event()

    def on_change(self, change: Change) -> None:
        self.changes.append(change)

    async def on_reload(self) -> None:
        self.reloading.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionResetError("flaky")
        self.reloads += 1


@asynccontextmanager
async def listening(dsn: str, recorder: Recorder) -> AsyncIterator[ChangeListener]:
    async with ChangeListener(
        dsn=dsn, on_change=recorder.on_change, on_reload=recorder.on_reload, settings=SETTINGS
    ) as listener:
        await asyncio.wait_for(listener.wait_listening(), 5)
        yield listener


async def heartbeat_round_trip(listener: ChangeListener) -> None:
    """Wait until one more of our heartbeats came back: earlier notifications were handled."""
    seen = listener.stats()["heartbeats_received"]
    await eventually(lambda: listener.stats()["heartbeats_received"] > seen)


async def test_connect_triggers_a_reload_and_changes_arrive_parsed(
    db: asyncpg.Connection, database_url: str
) -> None:
    recorder = Recorder()
    async with listening(database_url, recorder):
        await eventually(lambda: recorder.reloads == 1)
        await create_enterprise(db, "0367", integrations={"uon": False})
        await db.execute(
            """UPDATE enterprises SET integrations_config = '{"uon": {"enabled": true}}'
                WHERE number = '0367'"""
        )
        await eventually(lambda: len(recorder.changes) == 2)
    assert recorder.changes == [Change("0367", "*"), Change("0367", "uon")]


async def test_notifications_during_a_reload_cause_exactly_one_more_reload(
    db: asyncpg.Connection, database_url: str
) -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    async with listening(database_url, recorder) as listener:
        await asyncio.wait_for(recorder.reloading.wait(), 5)
        for i in range(5):
            await db.execute(
                "SELECT pg_notify('integrations_changed', $1)",
                f'{{"enterprise_number": "03{i:02}", "integration_type": "*"}}',
            )
        await eventually(lambda: len(recorder.changes) == 5)
        recorder.gate.set()
        await eventually(lambda: recorder.reloads == 2)
        await heartbeat_round_trip(listener)
        assert recorder.reloads == 2
        assert listener.stats()["reloads"] == 2


async def test_a_notification_outside_a_reload_does_not_reload(
    db: asyncpg.Connection, database_url: str
) -> None:
    recorder = Recorder()
    async with listening(database_url, recorder) as listener:
        await eventually(lambda: recorder.reloads == 1)
        await create_enterprise(db, "0367")
        await eventually(lambda: len(recorder.changes) == 1)
        await heartbeat_round_trip(listener)
        assert recorder.reloads == 1


async def test_a_failed_reload_is_retried(database_url: str) -> None:
    recorder = Recorder()
    recorder.failures_left = 2
    async with listening(database_url, recorder) as listener:
        await eventually(lambda: recorder.reloads == 1)
        stats = listener.stats()
    assert stats["reload_errors"] == 2
    assert stats["last_error"] == "ConnectionResetError"


async def test_unparseable_payload_asks_for_a_full_reload(
    db: asyncpg.Connection, database_url: str
) -> None:
    recorder = Recorder()
    async with listening(database_url, recorder):
        await eventually(lambda: recorder.reloads == 1)
        await db.execute("SELECT pg_notify('integrations_changed', 'not json')")
        await eventually(lambda: recorder.reloads == 2)
    assert recorder.changes == []


async def test_a_failing_on_change_does_not_stop_the_listener(
    db: asyncpg.Connection, database_url: str
) -> None:
    seen: list[Change] = []

    def on_change(change: Change) -> None:
        seen.append(change)
        raise RuntimeError("bug in a consumer")

    async def on_reload() -> None:
        return None

    async with ChangeListener(
        dsn=database_url, on_change=on_change, on_reload=on_reload, settings=SETTINGS
    ) as listener:
        await asyncio.wait_for(listener.wait_listening(), 5)
        await create_enterprise(db, "0367")
        await create_enterprise(db, "0368")
        await eventually(lambda: len(seen) == 2)
        assert listener.stats()["state"] == "listening"


async def test_terminated_connection_reconnects_and_reloads(
    db: asyncpg.Connection, database_url: str
) -> None:
    recorder = Recorder()
    async with listening(database_url, recorder) as listener:
        await eventually(lambda: recorder.reloads == 1)
        pid = listener.backend_pid
        assert await db.fetchval(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid
        ) == ("vochi-crm-listener")
        await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        await eventually(lambda: recorder.reloads == 2)
        await asyncio.wait_for(listener.wait_listening(), 5)
        await create_enterprise(db, "0367")
        await eventually(lambda: len(recorder.changes) == 1)
        stats = listener.stats()
    assert (stats["connects"], stats["disconnects"]) == (2, 1)
    assert stats["state"] == "listening"


async def test_unreachable_database_is_retried_with_backoff_and_reported(
    database_url: str,
) -> None:
    recorder = Recorder()
    bad = with_database(database_url, "no_such_database_here")
    async with ChangeListener(
        dsn=bad, on_change=recorder.on_change, on_reload=recorder.on_reload, settings=SETTINGS
    ) as listener:
        await eventually(lambda: listener.stats()["connect_errors"] >= 3)
        stats = listener.stats()
    assert stats["state"] in ("connecting", "backoff")
    assert stats["last_error"] == "InvalidCatalogNameError"
    assert recorder.reloads == 0
    assert "no_such_database" not in repr(listener)


async def test_a_silently_hung_connection_is_caught_by_the_heartbeat_and_replaced(
    private_postgres: EmbeddedPostgres,
) -> None:
    """The backend is frozen (SIGSTOP): no error, no FIN, just silence, like a lost network."""
    dsn = private_postgres.admin_dsn
    recorder = Recorder()
    settings = ListenerSettings(
        heartbeat_interval=0.1,
        heartbeat_timeout=0.5,
        connect_timeout=0.5,
        reconnect=BackoffPolicy(base=0.05, cap=0.1),
    )
    async with ChangeListener(
        dsn=dsn, on_change=recorder.on_change, on_reload=recorder.on_reload, settings=settings
    ) as listener:
        await asyncio.wait_for(listener.wait_listening(), 5)
        await heartbeat_round_trip(listener)
        frozen = listener.backend_pid
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        try:
            await eventually(lambda: listener.stats()["connects"] == 2, within=5.0)
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert listener.backend_pid != frozen
        await heartbeat_round_trip(listener)
        stats = listener.stats()
    assert stats["disconnects"] == 1
    assert stats["heartbeat_age"] is not None
    assert recorder.reloads == 2
