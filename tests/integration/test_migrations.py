"""The schema migrations and the integrations_changed trigger, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import secrets

import asyncpg
import pytest

from retailcrm_service.storage.database import load_migrations, migrate, with_database
from tests.support.pg import PgHarness, create_enterprise


def test_migrations_are_numbered_uniquely_and_ordered() -> None:
    versions = [int(m.version) for m in load_migrations()]
    assert versions == sorted(versions)
    assert len(versions) == len(set(versions))


async def test_migrate_twice_concurrently_applies_each_once(pg_harness: PgHarness) -> None:
    name = f"vochi_raw_{secrets.token_hex(4)}"
    fresh = with_database(pg_harness.admin_dsn, name)
    admin = await asyncpg.connect(pg_harness.admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        first, second = await asyncio.gather(migrate(fresh), migrate(fresh))
        assert sorted(first + second) == [m.version for m in load_migrations()]
        assert await migrate(fresh) == []
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def _notifications(
    db: asyncpg.Connection, database_url: str, sql: str, *args: object
) -> list:
    received: list[dict] = []
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(
            "integrations_changed", lambda *a: received.append(json.loads(a[3]))
        )
        await db.execute(sql, *args)
        for _ in range(50):
            await asyncio.sleep(0.02)
            if received:
                await asyncio.sleep(0.05)
                break
    finally:
        await listener.close()
    return sorted(received, key=lambda n: (n["enterprise_number"], n["integration_type"]))


async def test_plain_sql_config_change_notifies_each_changed_key(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": False, "uon": True})
    got = await _notifications(
        db,
        database_url,
        """UPDATE enterprises SET integrations_config = integrations_config
             || '{"retailcrm": {"enabled": true}, "bitrix24": {"enabled": false}}'::jsonb
           WHERE number = '0367'""",
    )
    assert got == [
        {"enterprise_number": "0367", "integration_type": "bitrix24"},
        {"enterprise_number": "0367", "integration_type": "retailcrm"},
    ]


async def test_active_flag_insert_and_delete_notify_star(
    db: asyncpg.Connection, database_url: str
) -> None:
    star = {"enterprise_number": "0400", "integration_type": "*"}
    assert await _notifications(
        db,
        database_url,
        "INSERT INTO enterprises (number, name2, secret) VALUES ('0400', 't400', 's')",
    ) == [star]
    assert await _notifications(
        db, database_url, "UPDATE enterprises SET active = false WHERE number = '0400'"
    ) == [star]
    assert await _notifications(
        db, database_url, "DELETE FROM enterprises WHERE number = '0400'"
    ) == [star]


async def test_unrelated_update_and_rolled_back_change_notify_nothing(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0500", integrations={"retailcrm": True})
    assert (
        await _notifications(
            db, database_url, "UPDATE enterprises SET ip = '10.0.0.9' WHERE number = '0500'"
        )
        == []
    )
    with pytest.raises(asyncpg.RaiseError):
        await _notifications(
            db,
            database_url,
            """DO $$ BEGIN
                 UPDATE enterprises SET active = false WHERE number = '0500';
                 RAISE EXCEPTION 'roll back';
               END $$""",
        )
