"""Database plumbing shared by the commands: where PostgreSQL is, and the schema migrations."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import tempfile
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg

if TYPE_CHECKING:
    from pgserver import PostgresServer

logger = logging.getLogger(__name__)

# What a database outage looks like from asyncpg (a restart can surface any of these).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

# Any constant works; two `migrate` runs at once serialise on it.
MIGRATION_LOCK_ID = 0x56_6F_63_68_69_01  # "Vochi" + 1

_embedded_servers: dict[Path, PostgresServer] = {}


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The numbered ``migrations/NNN_name.sql`` files, in order."""
    folder = resources.files("retailcrm_service.storage") / "migrations"
    found = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        version, _, rest = entry.name.partition("_")
        if not version.isdigit():
            raise ValueError(f"migration file {entry.name!r} must start with a number")
        found.append(Migration(version, rest.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda m: int(m.version))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration numbers in {versions}")
    return found


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations once each; safe to run from several processes at once.

    Returns the versions applied by this call.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            return await _apply_pending(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection) -> list[str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS vochi_schema_migrations (
               version    text PRIMARY KEY,
               name       text NOT NULL,
               checksum   text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    rows = await conn.fetch("SELECT version, checksum FROM vochi_schema_migrations")
    applied = {r["version"]: r["checksum"] for r in rows}
    done = []
    for migration in load_migrations():
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                logger.warning("migration.changed_after_apply version=%s", migration.version)
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO vochi_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        logger.info("migration.applied version=%s name=%s", migration.version, migration.name)
        done.append(migration.version)
    return done


def embedded_database_url(data_dir: str | os.PathLike[str]) -> str:
    """Start (or join) the embedded PostgreSQL under ``data_dir`` and return its DSN."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (services, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        import pgserver  # imported lazily: only needed without DATABASE_URL

    pgdata = Path(data_dir).resolve() / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    server = _embedded_servers.get(pgdata)
    if server is None:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        _embedded_servers[pgdata] = server
    return str(server.get_uri())


@contextlib.asynccontextmanager
async def scratch_database(
    prefix: str = "vochi_scratch", *, server: str | None
) -> AsyncIterator[str]:
    """A throwaway migrated database (benchmarks, tools): on the ``server`` DSN when given
    (``settings.database_url_from()``: ``DATABASE_URL``), otherwise on a temporary embedded
    server that is stopped and deleted afterwards."""
    admin = server or ""
    embedded = None
    if not admin:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        pgdata = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))  # deleted with the server
        embedded = pgserver.get_server(pgdata, cleanup_mode="delete")
        admin = str(embedded.get_uri())
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(admin, name)
        await migrate(dsn)
        yield dsn
    finally:
        try:
            if conn.is_closed():  # the server was restarted meanwhile (a benchmark's fault)
                conn = await asyncpg.connect(admin)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()
        finally:
            if embedded is not None:
                embedded.cleanup()


def database_url(url: str | None, data_dir: str | os.PathLike[str]) -> str:
    """``url`` when given, otherwise the embedded server under ``data_dir``."""
    return url or embedded_database_url(data_dir)


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def redact_dsn(dsn: str) -> str:
    """A DSN fit for logs: the password replaced by ``***``."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))
