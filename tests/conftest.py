"""Session-wide real PostgreSQL and per-test databases; async tests run on anyio (asyncio)."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from retailcrm_service.ops.logs import HANDLER_NAME
from tests.support.pg import EmbeddedPostgres, PgHarness


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Mark every ``async def test_*`` for anyio before collection, so parametrize works too."""
    if inspect.iscoroutinefunction(obj) and collector.funcnamefilter(name):  # type: ignore[attr-defined]
        pytest.mark.anyio(obj)


@pytest.fixture(autouse=True)
def _root_log_handlers() -> Iterator[None]:
    """The service's log handler, when a test installs it on the root logger, goes with the
    test. ``retailcrm-service`` commands run in-process (``cli.main``) install it on the test's
    captured stderr, which pytest closes when the test ends: a later test's server thread
    logging through it printed "Logging error ... I/O operation on closed file"."""
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    yield
    for handler in root.handlers[:]:
        if handler.get_name() == HANDLER_NAME and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser DSN of the session's server: ``DATABASE_URL`` or an embedded one."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg-session"))
    try:
        yield server.admin_dsn
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_harness(pg_admin_dsn: str) -> Iterator[PgHarness]:
    harness = PgHarness.start(pg_admin_dsn)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def database_url(pg_harness: PgHarness) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    dsn = pg_harness.create_database()
    try:
        yield dsn
    finally:
        pg_harness.drop_database(dsn)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def private_postgres(tmp_path: os.PathLike[str]) -> Iterator[EmbeddedPostgres]:
    """A server of this test's own, which it may stop and restart (not yet migrated)."""
    server = EmbeddedPostgres(tmp_path)
    try:
        yield server
    finally:
        server.close()
