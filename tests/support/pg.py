"""A real PostgreSQL for tests: ``DATABASE_URL`` when set, otherwise the embedded ``pgserver``.

Each test gets its own database cloned from a migrated template, so tests run in any order.
Fault tests that stop or restart the server get a private embedded server of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from retailcrm_service.storage.database import migrate, with_database


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _admin_execute(admin_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


class EmbeddedPostgres:
    """A private embedded server that a test may stop, start and restart."""

    def __init__(self, base_dir: str | os.PathLike[str] | None = None) -> None:
        import pgserver

        self._dir = Path(base_dir or tempfile.mkdtemp(prefix="vochi-pg-"))
        self._server = pgserver.get_server(self._dir / "pgdata", cleanup_mode="delete")
        self.admin_dsn: str = self._server.get_uri()

    @property
    def pgdata(self) -> Path:
        return Path(self._server.pgdata)

    def stop(self, mode: str = "fast") -> None:
        from pgserver import pg_ctl

        pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self._server.system_user)

    def start(self, attempts: int = 3) -> None:
        """Start the stopped server; ``pg_ctl -w`` can time out on a loaded machine even though
        the server comes up, so a timed-out start is checked and retried."""
        for attempt in range(1, attempts + 1):
            try:
                with self._server._lock:
                    self._server.ensure_postgres_running()
                break
            except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
                if attempt == attempts:
                    raise
        assert self._server.get_uri() == self.admin_dsn, "socket moved after restart"

    def restart(self) -> None:
        self.stop()
        self.start()

    def psql(self, sql: str, database: str = "postgres") -> str:
        from pgserver import POSTGRES_BIN_PATH

        return subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                with_database(self.admin_dsn, database),
            ],
            input=sql,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def close(self) -> None:
        self._server._cleanup()


@dataclass
class PgHarness:
    """Creates per-test databases from a migrated template on one server."""

    admin_dsn: str
    template: str

    @classmethod
    def start(cls, admin_dsn: str) -> PgHarness:
        template = f"vochi_tmpl_{os.getpid()}_{secrets.token_hex(3)}"
        _run(_admin_execute(admin_dsn, f'CREATE DATABASE "{template}"'))
        _run(migrate(with_database(admin_dsn, template)))
        _run(_admin_execute(admin_dsn, f'ALTER DATABASE "{template}" WITH IS_TEMPLATE true'))
        return cls(admin_dsn, template)

    def create_database(self) -> str:
        name = f"vochi_test_{secrets.token_hex(6)}"
        _run(_admin_execute(self.admin_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        return with_database(self.admin_dsn, name)

    def drop_database(self, dsn: str) -> None:
        name = dsn.split("?")[0].rsplit("/", 1)[-1]
        _run(_admin_execute(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        _run(
            _admin_execute(
                self.admin_dsn,
                f'ALTER DATABASE "{self.template}" WITH IS_TEMPLATE false',
                f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)',
            )
        )


async def create_enterprise(
    conn: asyncpg.Connection,
    number: str,
    *,
    name: str | None = None,
    name2: str | None = None,
    secret: str | None = None,
    ip: str | None = "127.0.0.1",
    active: bool = True,
    integrations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Insert an enterprise the way the platform does; returns its row as a dict.

    ``integrations`` maps a CRM name to its config, or to a bool as shorthand for
    ``{"enabled": bool}``.
    """
    config = {
        crm: ({"enabled": value} if isinstance(value, bool) else value)
        for crm, value in (integrations or {}).items()
    }
    row = await conn.fetchrow(
        """INSERT INTO enterprises (number, name, name2, secret, ip, active, integrations_config)
           VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) RETURNING *""",
        number,
        name or f"Enterprise {number}",
        name2 if name2 is not None else f"token-{number}",
        secret if secret is not None else secrets.token_hex(16),
        ip,
        active,
        json.dumps(config),
    )
    return dict(row)
