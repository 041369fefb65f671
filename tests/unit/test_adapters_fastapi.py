"""FastAPI glue and the call service settings, in memory: lifespan, dependency, /health, /stats."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapters.call_service import DEFAULT_TARGETS, build_parser, parse_targets, settings_from
from adapters.fastapi import CrmDep, crm_lifespan, operations_router
from tests.unit.test_client import MemoryMatrix, Receivers
from vochi_crm_client import CallEvent, CrmClient, DispatchConfig

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and hand its state to every request, as uvicorn does."""
    async with app.router.lifespan_context(app) as state:

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await app({**scope, "state": dict(state or {})}, receive, send)

        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://cs.test") as client:
            yield client


def app_with_client(receivers: Receivers) -> FastAPI:
    def make() -> CrmClient:
        matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
        return CrmClient(
            targets={"retailcrm": "http://retailcrm.test/api/events"},
            matrix=matrix,
            transport=httpx.MockTransport(receivers),
            dispatch=DispatchConfig(linger=0),
        )

    app = FastAPI(lifespan=crm_lifespan(make))
    app.include_router(operations_router(extra_stats=lambda: {"extra": 1}))

    @app.post("/emit/{uid}")
    async def emit(uid: str, crm: CrmDep) -> dict[str, str]:
        crm.emit(CallEvent(enterprise_number="0367", event_type="hangup", call_unique_id=uid))
        return {"ok": uid}

    return app


async def test_the_lifespan_owns_the_client_and_closing_flushes_it() -> None:
    receivers = Receivers()
    async with serving(app_with_client(receivers)) as client:
        assert (await client.post("/emit/1.1")).status_code == 200
        assert (await client.get("/health")).json()["status"] == "ok"
        stats = (await client.get("/stats")).json()
        assert stats["extra"] == 1
        assert stats["emitted"] == 1
    # Leaving the app drained the client: the event reached its target.
    assert [e["call_unique_id"] for e in receivers.events["retailcrm.test"]] == ["1.1"]


async def test_the_dependency_fails_loudly_without_the_lifespan() -> None:
    app = FastAPI()
    app.include_router(operations_router())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cs.test") as client:
        with pytest.raises(RuntimeError, match="crm_lifespan"):
            await client.get("/health")


def test_targets_parse_from_name_equals_url_pairs() -> None:
    assert parse_targets(DEFAULT_TARGETS.split(",")) == {
        "retailcrm": "http://127.0.0.1/retailcrm/api/events"
    }
    assert parse_targets(["a=http://x/1", " b = https://y/2 ", ""]) == {
        "a": "http://x/1",
        "b": "https://y/2",
    }
    for bad in (["retailcrm"], ["=http://x"], ["a=ftp://x"], []):
        with pytest.raises(ValueError, match="target"):
            parse_targets(bad)


def test_settings_come_from_flags_then_the_environment() -> None:
    env = {
        "DATABASE_URL": "postgresql://u@h/db",
        "VOCHI_CRM_TARGETS": "uon=http://u/1,x=http://x/2",
    }
    from_env = settings_from(build_parser().parse_args([]), env)
    assert dict(from_env.targets) == {"uon": "http://u/1", "x": "http://x/2"}
    assert from_env.dsn == "postgresql://u@h/db"
    assert "postgresql" not in repr(from_env)  # the DSN may hold a password
    args = build_parser().parse_args(["--target", "retailcrm=http://r/1", "--forward-internal"])
    from_flags = settings_from(args, env)
    assert dict(from_flags.targets) == {"retailcrm": "http://r/1"}
    assert from_flags.forward_internal
    assert isinstance(args, argparse.Namespace)


def test_the_cli_refuses_a_malformed_target_without_starting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.call_service import main

    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1:1/none")
    assert main(["--target", "retailcrm"]) == 2
    assert "NAME=URL" in capsys.readouterr().err
