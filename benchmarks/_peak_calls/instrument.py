"""Counting a process's PostgreSQL statements, for "queries per event".

PostgreSQL itself cannot say (the embedded server has no ``pg_stat_statements``), so each
measured process counts what it sends: ``install()`` wraps asyncpg's ``Connection`` so that every
statement round trip (``execute`` without arguments, i.e. a simple query such as ``BEGIN`` or
``COMMIT``; every prepared-statement execution behind ``fetch*``/``execute`` with arguments; one
``executemany``) adds one, and a daemon thread writes the running total to a file four times a
second. The file survives a SIGKILL with its last total; a restarted process writes its own.
The product code is unchanged: the benchmark's role wrapper installs this, then calls the real
entry point (``retailcrm_service.app.serve``, ``adapters.call_service.main``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_count = [0]


def install() -> None:
    from asyncpg.connection import Connection

    execute, execute_prepared, execute_many = (
        Connection.execute,
        Connection._execute,
        Connection._executemany,
    )

    async def counted_execute(self: Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if not args:  # with arguments it goes through _execute, counted there
            _count[0] += 1
        return await execute(self, query, *args, **kwargs)

    async def counted_prepared(self: Connection, *args: Any, **kwargs: Any) -> Any:
        _count[0] += 1
        return await execute_prepared(self, *args, **kwargs)

    async def counted_many(self: Connection, *args: Any, **kwargs: Any) -> Any:
        _count[0] += 1
        return await execute_many(self, *args, **kwargs)

    Connection.execute = counted_execute  # type: ignore[method-assign]
    Connection._execute = counted_prepared  # type: ignore[method-assign]
    Connection._executemany = counted_many  # type: ignore[method-assign]


def report_to(folder: str, name: str) -> None:
    """Write ``{"queries": n}`` to ``folder/name-<pid>.json`` every 0.25 s (a daemon thread)."""
    path = Path(folder) / f"{name}-{os.getpid()}.json"

    def loop() -> None:
        while True:  # a daemon thread: ends with the process
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"queries": _count[0]}))
            tmp.replace(path)
            time.sleep(0.25)

    threading.Thread(target=loop, name="query-count", daemon=True).start()


def total(folder: str | Path) -> int:
    """The queries of every process that reported to ``folder`` (killed ones included)."""
    found = 0
    for path in Path(folder).glob("*.json"):
        try:
            found += int(json.loads(path.read_text())["queries"])
        except (ValueError, KeyError, OSError):
            continue  # being replaced right now: the next read has it
    return found
