"""The read side of one enterprise's journal (``integration_logs``) and delivery (the outbox).

What the admin's «Журнал» and «Диагностика» show; every query is scoped to one enterprise.

- ``JournalFilter``: phone, call id, event type, status, period (``since``/``until``);
- ``search_logs(pool, n, f, before_id=, limit=)``: newest first, keyset-paginated by id (the
  next page starts below the last id shown, so rows written meanwhile never shift a page);
- ``search_outbox(pool, n, f, before_id=, limit=)``: the delivery history, the same way;
- ``call_trace(pool, n, call_id)``: one call's host events as received with their outbox state,
  and every journal row of the call (RetailCRM requests and answers, stored masked);
- ``last_outcomes(pool, n)``: the last successes, the last errors and the last connection test;
- ``backlog(pool, n)``: pending and due outbox rows of the enterprise and its oldest due event.

Journal rows are stored masked (``journal.mask_payload``): nothing here unmasks anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

INTEGRATION = "retailcrm"
MAX_PAGE = 200
OUTBOX_STATES = ("pending", "delivered", "expired", "superseded", "dead", "skipped")


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalFilter:
    phone: str | None = None
    call_id: str | None = None
    event_type: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _log_view(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"],
        "created_at": _iso(r["created_at"]),
        "event_type": r["event_type"],
        "status": r["status"],
        "call_unique_id": r["call_unique_id"],
        "error_message": r["error_message"],
        "request": _json(r["request_data"]),
        "response": _json(r["response_data"]),
    }


def _outbox_view(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"],
        "created_at": _iso(r["created_at"]),
        "call_unique_id": r["call_unique_id"],
        "event_type": r["event_type"],
        "origin": r["origin"],
        "kind": r["kind"],
        "state": r["state"],
        "attempts": r["attempts"],
        "last_error": r["last_error"],
        "due_at": _iso(r["due_at"]),
        "finished_at": _iso(r["finished_at"]),
        "payload": _json(r["payload"]),
    }


def _limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_PAGE))


async def search_logs(
    pool: asyncpg.Pool,
    number: str,
    f: JournalFilter,
    *,
    before_id: int | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    conditions = ["enterprise_number = $1", "integration_type = $2"]
    args: list[Any] = [number, INTEGRATION]

    def add(sql: str, value: Any) -> None:
        args.append(value)
        conditions.append(sql.format(f"${len(args)}"))

    if f.call_id:
        add("call_unique_id = {}", f.call_id)
    if f.event_type:
        add("event_type = {}", f.event_type)
    if f.status:
        add("status = {}", f.status)
    if f.since is not None:
        add("created_at >= {}", f.since)
    if f.until is not None:
        add("created_at < {}", f.until)
    if f.phone:
        # Phones sit anywhere in the stored request (popups, uploads, lookups): a text search.
        add("request_data::text LIKE '%' || {} || '%'", f.phone)
    if before_id is not None:
        add("id < {}", before_id)
    args.append(_limit(limit))
    rows = await pool.fetch(
        f"""SELECT id, created_at, event_type, status, call_unique_id, error_message,
                   request_data, response_data
            FROM integration_logs WHERE {" AND ".join(conditions)}
            ORDER BY id DESC LIMIT ${len(args)}""",  # noqa: S608 (fixed condition strings)
        *args,
    )
    return [_log_view(r) for r in rows]


async def search_outbox(
    pool: asyncpg.Pool,
    number: str,
    f: JournalFilter,
    *,
    before_id: int | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    conditions = ["enterprise_number = $1"]
    args: list[Any] = [number]

    def add(sql: str, value: Any) -> None:
        args.append(value)
        conditions.append(sql.format(f"${len(args)}"))

    if f.call_id:
        add("call_unique_id = {}", f.call_id)
    if f.event_type:
        add("event_type = {}", f.event_type)
    if f.status:
        add("state = {}", f.status)
    if f.since is not None:
        add("created_at >= {}", f.since)
    if f.until is not None:
        add("created_at < {}", f.until)
    if f.phone:
        add("payload::text LIKE '%' || {} || '%'", f.phone)
    if before_id is not None:
        add("id < {}", before_id)
    args.append(_limit(limit))
    rows = await pool.fetch(
        f"""SELECT id, created_at, call_unique_id, event_type, origin, kind, state, attempts,
                   last_error, due_at, finished_at, payload
            FROM retailcrm_outbox WHERE {" AND ".join(conditions)}
            ORDER BY id DESC LIMIT ${len(args)}""",  # noqa: S608 (fixed condition strings)
        *args,
    )
    return [_outbox_view(r) for r in rows]


async def call_trace(pool: asyncpg.Pool, number: str, call_id: str) -> dict[str, Any]:
    """Everything about one call, oldest first: its events and outbox rows, its journal rows."""
    events = await pool.fetch(
        """SELECT id, created_at, call_unique_id, event_type, origin, kind, state, attempts,
                  last_error, due_at, finished_at, payload
           FROM retailcrm_outbox WHERE enterprise_number = $1 AND call_unique_id = $2
           ORDER BY id""",
        number,
        call_id,
    )
    logs = await pool.fetch(
        """SELECT id, created_at, event_type, status, call_unique_id, error_message,
                  request_data, response_data
           FROM integration_logs
           WHERE enterprise_number = $1 AND integration_type = $2 AND call_unique_id = $3
           ORDER BY id LIMIT 500""",
        number,
        INTEGRATION,
        call_id,
    )
    return {
        "call_unique_id": call_id,
        "events": [_outbox_view(r) for r in events],
        "requests": [_log_view(r) for r in logs],
    }


async def last_outcomes(pool: asyncpg.Pool, number: str, *, limit: int = 5) -> dict[str, Any]:
    async def latest(where: str) -> list[dict[str, Any]]:
        rows = await pool.fetch(
            f"""SELECT id, created_at, event_type, status, call_unique_id, error_message,
                       request_data, response_data
                FROM integration_logs
                WHERE enterprise_number = $1 AND integration_type = $2 AND {where}
                ORDER BY id DESC LIMIT $3""",  # noqa: S608 (fixed condition strings)
            number,
            INTEGRATION,
            limit,
        )
        return [_log_view(r) for r in rows]

    tests = await latest("event_type = 'test_connection'")
    return {
        "successes": await latest("status = 'success'"),
        "errors": await latest("status <> 'success'"),
        "last_test": tests[0] if tests else None,
    }


async def backlog(pool: asyncpg.Pool, number: str) -> dict[str, Any]:
    row = await pool.fetchrow(
        """SELECT count(*) AS pending,
                  count(*) FILTER (WHERE due_at <= now()) AS due,
                  min(due_at) FILTER (WHERE due_at <= now()) AS oldest_due,
                  count(*) FILTER (WHERE attempts > 0) AS retrying
           FROM retailcrm_outbox WHERE enterprise_number = $1 AND state = 'pending'""",
        number,
    )
    oldest = await pool.fetchrow(
        """SELECT id, call_unique_id, event_type, due_at, attempts, last_error
           FROM retailcrm_outbox
           WHERE enterprise_number = $1 AND state = 'pending' AND due_at <= now()
           ORDER BY due_at, id LIMIT 1""",
        number,
    )
    states = await pool.fetch(
        """SELECT state, count(*) AS n FROM retailcrm_outbox
           WHERE enterprise_number = $1 GROUP BY state""",
        number,
    )
    return {
        "pending": row["pending"],
        "due": row["due"],
        "retrying": row["retrying"],
        "oldest_due_at": _iso(row["oldest_due"]),
        "oldest_due": None
        if oldest is None
        else {
            "id": oldest["id"],
            "call_unique_id": oldest["call_unique_id"],
            "event_type": oldest["event_type"],
            "attempts": oldest["attempts"],
            "last_error": oldest["last_error"],
        },
        "states": {r["state"]: r["n"] for r in states},
    }
