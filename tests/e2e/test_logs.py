"""Logs of real processes: JSON lines from both programs, one request id followed from a host
webhook through the call service into the service, and no secret in any line."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests.e2e.test_pipeline import wait_for_rows
from tests.support.pipeline import (  # noqa: F401  (api_key, crm, enterprise: pytest fixtures)
    FAST_ENV,
    api_key_fixture,
    crm_fixture,
    enterprise_fixture,
    fixture_records,
    wait_drained,
)
from tests.support.procs import ServiceProcess


@pytest.fixture
def password_dsn(database_url: str) -> Iterator[tuple[str, str]]:
    """A DSN of this test's database with a role that has a password: (dsn, password)."""
    role, password = f"vochi_logs_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(12)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"))
    parts = urlsplit(database_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    dsn = urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))
    try:
        yield dsn, password
    finally:
        asyncio.run(execute(f"DROP ROLE IF EXISTS {role}"))


def _json_lines(proc: ServiceProcess) -> list[dict[str, object]]:
    text = proc.log_path.read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


@pytest.mark.slow
def test_one_request_id_follows_a_call_across_processes_and_no_secret_is_logged(
    password_dsn: tuple[str, str], crm: ServiceProcess, enterprise: str, api_key: str
) -> None:
    dsn, db_password = password_dsn
    hidden = {
        "RETAILCRM_JWT_SECRET": f"jwt-{secrets.token_hex(20)}",
        "RETAILCRM_SECRET_KEY": f"key-{secrets.token_hex(20)}",
        "RETAILCRM_INTERNAL_TOKEN": f"tok-{secrets.token_hex(20)}",
    }
    env = {**FAST_ENV, **hidden, "DATABASE_URL": dsn, "RETAILCRM_LOG_FORMAT": "json"}
    service = ServiceProcess.service(dsn, env=env)
    service.argv += ["--log-level", "debug"]
    with service:
        calls = ServiceProcess.call_service(dsn, targets={"retailcrm": service.url + "/api/events"})
        calls.argv += ["--log-format", "json", "--log-level", "debug"]
        with calls:
            sent = []
            for index, record in enumerate(fixture_records()):
                body = record["body"]
                request_id = f"trace-{index}"
                response = httpx.post(
                    f"{calls.url}/{record['event']}",
                    json=body,
                    headers={"Token": body["Token"], "X-Request-ID": request_id},
                    timeout=10,
                )
                assert response.status_code == 200, response.text
                assert response.headers["x-request-id"] == request_id
                sent.append(request_id)
            wait_for_rows(dsn, 12)
            asyncio.run(wait_drained(dsn))
            generated = httpx.get(calls.url + "/health", timeout=5).headers["x-request-id"]
            assert generated
            assert generated not in sent
            # a hostile id is replaced, not echoed into logs
            hostile = httpx.get(
                service.url + "/health", headers={"X-Request-ID": "x y\tlevel=error"}, timeout=5
            )
            assert hostile.headers["x-request-id"] != "x y\tlevel=error"
            call_lines = _json_lines(calls)
        service_lines = _json_lines(service)

    queued = [line for line in call_lines if line.get("event") == "call_service.queued"]
    assert len(queued) == 12
    assert {line["request_id"] for line in queued} <= set(sent)
    committed = [line for line in service_lines if line.get("event") == "events.committed"]
    carried = {rid for line in committed for rid in str(line.get("request_id", "")).split(",")}
    # every webhook that queued an event is named by the batch POST that carried it
    assert {line["request_id"] for line in queued} <= carried
    assert any(line.get("logger") == "uvicorn.error" for line in service_lines)

    everything = "\n".join(json.dumps(line) for line in call_lines + service_lines)
    for name, value in hidden.items():
        assert value not in everything, name
    assert api_key not in everything
    assert db_password not in everything
