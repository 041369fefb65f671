"""``/openapi.json``: internal callers get a document listing every internal route with its
models; the public side is refused; real answers fit the documented models; docs/api.md is the
document rendered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from fastapi.routing import APIRoute
from pydantic import BaseModel

from retailcrm_service.api import openapi
from retailcrm_service.app import create_app
from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings

REMOTE = {"X-Real-IP": "203.0.113.9"}  # what nginx sets for a caller on the internet
PUBLIC_PREFIXES = ("/retailcrm-admin", "/retailcrm/")


def _internal_routes(database_url: str) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves outside the admin UI and the callbacks."""
    app = create_app(service_settings(database_url))
    out = set()
    for route in _api_routes(app.routes):
        if not route.path.startswith(PUBLIC_PREFIXES):
            out |= {(method, route.path) for method in route.methods}
    assert ("POST", "/api/events") in out
    return out


def _api_routes(routes: Any) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # an included router (newer FastAPI)
            yield from _api_routes(route.original_router.routes)


async def test_internal_callers_get_every_internal_route_with_its_models(
    database_url: str,
) -> None:
    async with (
        running_service(service_settings(database_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as http,
    ):
        response = await http.get("/openapi.json")
        alias = await http.get("/api/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert alias.json() == spec
    assert spec["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert documented == _internal_routes(database_url)
    schemas = spec["components"]["schemas"]
    assert {"Error", "ErrorDetail", "EventsIn", "EventsAccepted", "ConfigIn"} <= set(schemas)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            success = [s for s in op["responses"] if s.startswith("2")]
            assert success, (method, path)
            if method in ("put",) or path.endswith(("/events", "/smart-redirect")):
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.rsplit("/", 1)[-1] in schemas
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith("/Error"), (method, path, status)
    events = spec["paths"]["/api/events"]["post"]
    assert events["requestBody"]["content"]["application/json"]["example"]["events"]
    assert events["responses"]["202"]["content"]["application/json"]["example"]["accepted"] == 1


async def test_the_document_is_refused_from_the_public_side(database_url: str) -> None:
    async with (
        running_service(service_settings(database_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as http,
    ):
        answers = [await http.get(path, headers=REMOTE) for path in openapi_paths()]
        docs = [await http.get(path) for path in ("/docs", "/redoc")]
    for answer in answers:
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "forbidden"
    assert all(d.status_code == 404 for d in docs)


def openapi_paths() -> tuple[str, ...]:
    return ("/openapi.json", "/api/openapi.json")


def _fits(model: type[BaseModel], answer: httpx.Response, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return model.model_validate(answer.json())


async def test_real_answers_fit_the_documented_models(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": False})
    event = {
        "enterprise_number": "0367",
        "event_type": "hangup",
        "call_unique_id": "1.1",
        "payload": {"UniqueId": "1.1"},
    }
    settings = service_settings(database_url)
    async with (
        running_service(settings, parts={"events", "smart_redirect"}) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
    ):
        _fits(openapi.Health, await http.get("/health"))
        _fits(openapi.Stats, await http.get("/stats"))
        accepted = _fits(
            openapi.EventsAccepted,
            await http.post("/api/events", json={"events": [event, {"event_type": "x"}]}),
            202,
        )
        assert (accepted.accepted, len(accepted.rejected)) == (1, 1)
        _fits(openapi.Error, await http.post("/api/events", content=b"{"), 400)
        _fits(
            openapi.Replayed,
            await http.post("/api/events/replay", json={"enterprise_number": "0367"}),
        )
        _fits(
            openapi.SmartRedirectOut,
            await http.post(
                "/api/smart-redirect", json={"enterprise_number": "0367", "phone": "+375291234567"}
            ),
        )
        _fits(openapi.ConfigView, await http.get("/api/config/0367"))
        _fits(openapi.Error, await http.get("/api/config/9999"), 404)
        _fits(openapi.CacheRefreshed, await http.post("/api/config-cache/refresh/0367"))
        _fits(openapi.CacheRefreshedAll, await http.post("/api/config-cache/refresh-all"))
        _fits(openapi.ActiveEnterprises, await http.get("/api/config-cache/active-enterprises"))
        _fits(openapi.UserStatuses, await http.get("/api/user-status/0367"))
        _fits(openapi.ConfigDeleted, await http.delete("/api/config/0367"))


def test_docs_api_md_is_the_document_rendered() -> None:
    path = Path(__file__).resolve().parents[2] / "docs" / "api.md"
    assert path.read_text("utf-8") == openapi.markdown(), (
        "docs/api.md is out of date: python -m retailcrm_service.api.openapi > docs/api.md"
    )
