"""EnablementMatrix on a real PostgreSQL: the platform's enablement rule, tokens, coherence."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from retailcrm_service.storage.database import migrate
from tests.support.pg import EmbeddedPostgres, create_enterprise
from vochi_crm_client import (
    NOT_LOADED,
    BackoffPolicy,
    CacheSettings,
    EnablementMatrix,
    ListenerSettings,
    ListenerState,
    LoadError,
)
from vochi_crm_client.testing import FakeClock, settle

FAST_LISTENER = ListenerSettings(
    heartbeat_interval=0.2,
    heartbeat_timeout=2.0,
    connect_timeout=2.0,
    reconnect=BackoffPolicy(base=0.05, cap=0.2),
    reload_retry=BackoffPolicy(base=0.05, cap=0.2),
)
QUICK_CACHE = CacheSettings(load_timeout=2.0)


async def eventually(check: Callable[[], bool], *, within: float = 1.0) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.01)


def start_again(server: EmbeddedPostgres) -> None:
    try:
        server.start()
    except subprocess.TimeoutExpired:
        # pgserver's `pg_ctl -w` occasionally misses a server that is already up (its log
        # says "ready"); asking again finds the running postmaster.
        server.start()


def matrix(dsn: str, **kwargs: Any) -> EnablementMatrix:
    kwargs.setdefault("listener", FAST_LISTENER)
    kwargs.setdefault("cache", QUICK_CACHE)
    kwargs.setdefault("connect_timeout", 2.0)
    return EnablementMatrix(dsn=dsn, **kwargs)


async def test_enabled_means_active_and_enabled_true_for_every_integration_key(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(
        db,
        "0367",
        integrations={
            "retailcrm": True,
            "uon": False,
            "ms": {"enabled": True, "token": "x"},
            "bitrix24": {"enabled": "yes"},
            "smart": {"timeout": 3},
        },
    )
    await create_enterprise(db, "0400", active=False, integrations={"retailcrm": True})
    await create_enterprise(db, "0500")
    await db.execute("UPDATE enterprises SET integrations_config = NULL WHERE number = '0500'")
    async with matrix(database_url, listen=False) as m:
        assert m.lookup("0367") == frozenset({"retailcrm", "ms"})
        assert m.lookup("0400") == frozenset()
        assert m.lookup("0500") == frozenset()
        assert m.lookup("9999") is NOT_LOADED
        assert await m.integrations_for("9999") == frozenset()
        assert m.lookup("9999") is None
        assert m.stats()["preloaded"] is True


async def test_per_key_load_applies_the_same_rule_as_the_full_load(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": True, "uon": False})
    await create_enterprise(db, "0400", active=False, integrations={"retailcrm": True})
    async with matrix(database_url, listen=False, preload=False) as m:
        assert m.lookup("0367") is NOT_LOADED
        assert await m.integrations_for("0367") == frozenset({"retailcrm"})
        assert await m.integrations_for("0400") == frozenset()


async def test_tokens_resolve_by_name2_secret_or_number_with_name2_first(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367", name2="tok367", secret="a" * 32)
    await create_enterprise(db, "0400", name2="0367", secret="b" * 32)
    for preload in (True, False):
        async with matrix(database_url, listen=False, preload=preload) as m:
            assert await m.resolve_token("tok367") == "0367"
            assert await m.resolve_token("a" * 32) == "0367"
            assert await m.resolve_token("0400") == "0400"
            assert await m.resolve_token("0367") == "0400"  # name2 beats another's number
            assert await m.resolve_token("junk") is None
            assert m.lookup_token("tok367") == "0367"
            assert m.lookup_token("junk") is None


async def test_plain_sql_update_is_visible_within_one_second(
    db: asyncpg.Connection, database_url: str
) -> None:
    """Acceptance (a)."""
    await create_enterprise(db, "0367", integrations={"retailcrm": False})
    async with matrix(database_url) as m:
        assert m.listener is not None
        await asyncio.wait_for(m.listener.wait_listening(), 5)
        assert m.lookup("0367") == frozenset()
        await db.execute(
            """UPDATE enterprises
                  SET integrations_config = jsonb_set(integrations_config, '{retailcrm,enabled}',
                                                      'true')
                WHERE number = '0367'"""
        )
        await eventually(lambda: m.lookup("0367") == frozenset({"retailcrm"}), within=1.0)
        await db.execute("UPDATE enterprises SET active = false WHERE number = '0367'")
        await eventually(lambda: m.lookup("0367") == frozenset(), within=1.0)


async def test_new_enterprise_and_token_are_visible_despite_earlier_negative_lookups(
    db: asyncpg.Connection, database_url: str
) -> None:
    async with matrix(database_url) as m:
        assert m.listener is not None
        await asyncio.wait_for(m.listener.wait_listening(), 5)
        assert await m.integrations_for("0777") == frozenset()
        assert await m.resolve_token("tok777") is None
        await create_enterprise(db, "0777", name2="tok777", integrations={"uon": True})
        # The negative entries go (NOT_LOADED) or a reload already has the new values.
        await eventually(lambda: m.lookup("0777") is not None)
        await eventually(lambda: m.lookup_token("tok777") is not None)
        assert await m.integrations_for("0777") == frozenset({"uon"})
        assert await m.resolve_token("tok777") == "0777"
        await db.execute("UPDATE enterprises SET name2 = 'renamed' WHERE number = '0777'")
        await eventually(lambda: m.lookup_token("tok777") != "0777")
        assert await m.resolve_token("tok777") is None
        assert await m.resolve_token("renamed") == "0777"


async def test_change_made_while_the_listener_was_down_is_seen_after_reconnect(
    db: asyncpg.Connection, database_url: str
) -> None:
    """Acceptance (b): the change commits after pg_terminate_backend and sends no NOTIFY
    (triggers off), so only the full reload after the reconnect can reveal it."""
    await create_enterprise(db, "0367", integrations={"retailcrm": True})
    async with matrix(database_url) as m:
        assert m.listener is not None
        await asyncio.wait_for(m.listener.wait_listening(), 5)
        # The reload that follows the first connect must not be the one that sees the change.
        await eventually(lambda: m.stats()["listener"]["reloads"] == 1, within=5.0)
        pid = m.listener.backend_pid
        async with db.transaction():
            await db.execute("SET LOCAL session_replication_role = replica")
            await db.execute(
                """UPDATE enterprises SET integrations_config = '{"uon": {"enabled": true}}'
                    WHERE number = '0367'"""
            )
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        assert m.lookup("0367") == frozenset({"retailcrm"})
        await eventually(lambda: m.lookup("0367") == frozenset({"uon"}), within=5.0)
        await eventually(lambda: m.stats()["listener"]["reloads"] == 2)
        stats = m.stats()["listener"]
        assert (stats["connects"], stats["disconnects"]) == (2, 1)
        assert m.listener.backend_pid != pid


async def test_thousand_concurrent_lookups_of_a_cold_key_make_one_query(
    db: asyncpg.Connection, database_url: str
) -> None:
    """Acceptance (c)."""
    await create_enterprise(db, "0367", integrations={"retailcrm": True})
    async with matrix(database_url, listen=False, preload=False) as m:
        results = await asyncio.gather(*(m.integrations_for("0367") for _ in range(1000)))
        assert set(results) == {frozenset({"retailcrm"})}
        stats = m.stats()
    assert stats["queries"] == 1
    assert stats["matrix"]["loads"] == 1
    assert stats["matrix"]["misses"] == 1000


async def test_unknown_enterprise_costs_one_query_per_negative_ttl(
    database_url: str,
) -> None:
    """Acceptance (e), with a fake clock driving the TTLs."""
    clock = FakeClock()
    settings = CacheSettings(negative_ttl=10.0, load_timeout=2.0)
    async with matrix(
        database_url, listen=False, preload=False, cache=settings, clock=clock, sleep=clock.sleep
    ) as m:
        for period in range(1, 4):
            for i in range(1000):
                if i % 2:
                    assert await m.integrations_for("9999") == frozenset()
                else:
                    assert m.lookup("9999") in (None, NOT_LOADED)
            assert m.stats()["queries"] == period
            clock.advance(10)
            await settle()


async def test_heartbeats_prove_the_channel_and_other_listeners_ignore_them(
    db: asyncpg.Connection, database_url: str
) -> None:
    received: list[dict[str, Any]] = []
    raw = await asyncpg.connect(database_url)
    await raw.add_listener("integrations_changed", lambda *a: received.append(json.loads(a[3])))
    try:
        async with matrix(database_url) as first, matrix(database_url) as second:
            for m in (first, second):
                assert m.listener is not None
                await asyncio.wait_for(m.listener.wait_listening(), 5)
            await eventually(
                lambda: all(
                    (m.stats()["listener"]["heartbeats_received"] or 0) >= 2
                    for m in (first, second)
                ),
                within=3.0,
            )
            for m in (first, second):
                stats = m.stats()["listener"]
                assert stats["state"] == "listening"
                assert 0 <= stats["heartbeat_age"] < 1.0
                assert stats["notifications"] == 0
    finally:
        await raw.close()
    assert received
    assert all("enterprise_number" not in p and "heartbeat" in p for p in received)


async def test_database_outage_serves_the_snapshot_and_recovers_without_restart(
    private_postgres: EmbeddedPostgres,
) -> None:
    """Acceptance (d)."""
    dsn = private_postgres.admin_dsn
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await create_enterprise(conn, "0367", name2="tok367", integrations={"retailcrm": True})
    await conn.close()
    async with matrix(dsn) as m:
        assert m.listener is not None
        await asyncio.wait_for(m.listener.wait_listening(), 5)
        reloads_before = m.stats()["matrix"]["full_reloads"]

        private_postgres.stop()
        await eventually(lambda: m.listener.state is not ListenerState.LISTENING, within=5.0)
        with pytest.raises(LoadError):
            await m.refresh()
        with pytest.raises(LoadError):
            await m.integrations_for("0999")
        assert m.lookup("0367") == frozenset({"retailcrm"})
        assert await m.integrations_for("0367") == frozenset({"retailcrm"})
        assert await m.resolve_token("tok367") == "0367"
        await eventually(lambda: m.stats()["listener"]["connect_errors"] >= 1, within=5.0)
        stats = m.stats()
        assert stats["matrix"]["load_errors"] >= 2
        assert stats["matrix"]["full_reload_errors"] >= 1
        assert stats["listener"]["last_error"] is not None

        start_again(private_postgres)
        await asyncio.wait_for(m.listener.wait_listening(), 10)
        await eventually(lambda: m.stats()["matrix"]["full_reloads"] > reloads_before, within=5.0)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE enterprises SET active = false WHERE number = '0367'")
        finally:
            await conn.close()
        await eventually(lambda: m.lookup("0367") == frozenset(), within=1.0)
        assert await m.integrations_for("0999") == frozenset()


async def test_matrix_opened_while_the_database_is_down_catches_up_when_it_returns(
    private_postgres: EmbeddedPostgres,
) -> None:
    dsn = private_postgres.admin_dsn
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await create_enterprise(conn, "0367", integrations={"retailcrm": True})
    await conn.close()
    private_postgres.stop()
    async with matrix(dsn) as m:
        assert m.stats()["preloaded"] is False
        assert m.lookup("0367") is NOT_LOADED
        with pytest.raises(LoadError):
            await m.integrations_for("0367")
        start_again(private_postgres)
        assert m.listener is not None
        await asyncio.wait_for(m.listener.wait_listening(), 10)
        await eventually(lambda: m.lookup("0367") == frozenset({"retailcrm"}), within=5.0)
        assert json.loads(json.dumps(m.stats()))["listener"]["state"] == "listening"
