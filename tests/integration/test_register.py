"""Module registration and deletion: the exact module form, the sandbox, the journal.

The form is described in docs/retailcrm.md#integration-module.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from retailcrm_service.sandbox import AsyncSandboxServer
from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings, serving

PUBLIC = "https://pbx.example.by"


class Recorder:
    """A RetailCRM stand-in that records every request and answers success."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: Request) -> JSONResponse:
        self.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body": (await request.body()).decode(),
            }
        )
        return JSONResponse({"success": True, "info": {"notExistUsersIds": []}})


@contextlib.asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    app = Starlette(routes=[Route("/{path:path}", recorder.handle, methods=["GET", "POST"])])
    async with serving(app) as url:
        yield url, recorder


CONFIG = {
    "user_extensions": {"12": "151", "7": "150", "9": None},
    "external_phones": [{"siteCode": "main", "externalPhone": "+375172000000"}],
}


async def test_registration_sends_exactly_the_documented_form(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367")
    api_key = "RecordedKey0123456789abcdefXYZ00"
    settings = service_settings(database_url, public_url=PUBLIC)
    async with recording_server() as (crm_url, recorder), running_service(settings) as svc:
        async with httpx.AsyncClient(base_url=svc.url) as http:
            saved = await http.put(
                "/api/config/0367", json={"domain": crm_url, "api_key": api_key, **CONFIG}
            )
            assert saved.status_code == 200
            registered = await http.post("/retailcrm-admin/api/register/0367")
            logo = await http.get(urlsplit(f"{PUBLIC}/retailcrm-admin/static/logo.svg").path)
        await svc.runtime.logs.flush()
    assert registered.status_code == 200, registered.text
    assert registered.json()["registered"] is True
    assert logo.status_code == 200
    assert logo.headers["content-type"].startswith("image/svg+xml")

    (request,) = recorder.requests
    assert request["method"] == "POST"
    assert request["path"] == "/api/v5/integration-modules/vochi-telephony/edit"
    assert request["query"] == ""
    assert request["headers"]["x-api-key"] == api_key
    assert request["headers"]["content-type"] == "application/x-www-form-urlencoded"
    form = parse_qs(request["body"], strict_parsing=True)
    assert list(form) == ["integrationModule"]
    assert len(form["integrationModule"]) == 1
    module = json.loads(form["integrationModule"][0])

    stored = json.loads(
        await db.fetchval("SELECT integrations_config FROM enterprises WHERE number = '0367'")
    )["retailcrm"]
    account_url = module.pop("accountUrl")
    assert module == {
        "code": "vochi-telephony",
        "integrationCode": "vochi-telephony",
        "active": True,
        "name": "Vochi-CRM",
        "logo": f"{PUBLIC}/retailcrm-admin/static/logo.svg",
        "baseUrl": PUBLIC,
        "clientId": stored["clientId"],
        "integrations": {
            "telephony": {
                "makeCallUrl": f"{PUBLIC}/retailcrm/make-call",
                "changeUserStatusUrl": f"{PUBLIC}/retailcrm/status",
                "allowEdit": False,
                "inputEventSupported": True,
                "outputEventSupported": True,
                "hangupEventSupported": True,
                "additionalCodes": [{"userId": 7, "code": "150"}, {"userId": 12, "code": "151"}],
                "externalPhones": [{"siteCode": "main", "externalPhone": "+375172000000"}],
            }
        },
    }
    assert len(stored["clientId"]) >= 40
    parts = urlsplit(account_url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{PUBLIC}/retailcrm-admin/login"
    token = parse_qs(parts.query)["token"][0]
    claims = jwt.decode(
        token,
        settings.jwt_secret.get_secret_value(),
        algorithms=["HS256"],
        audience="retailcrm-admin",
    )
    assert claims["sub"] == "0367"
    assert claims["typ"] == "account"
    assert stored["module"]["registered"] is True
    assert stored["module"]["active"] is True

    row = await db.fetchrow("SELECT * FROM integration_logs WHERE event_type = 'register_module'")
    assert row is not None
    assert row["status"] == "success"
    assert row["integration_type"] == "retailcrm"
    assert stored["clientId"] not in row["request_data"]
    assert api_key not in row["request_data"]
    assert token not in row["request_data"]


async def test_register_test_and_delete_against_the_sandbox(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367")
    async with AsyncSandboxServer(rate_limit=False, demo_data=False) as crm:
        async with running_service(service_settings(database_url)) as svc:
            async with httpx.AsyncClient(base_url=svc.url) as http:
                await http.put("/api/config/0367", json={"domain": crm.url, "api_key": crm.api_key})
                tested = await http.post("/api/config/0367/test")
                wrong = await http.post(
                    "/api/config/0367/test", json={"api_key": "WrongKey0123456789abcdefghijklm"}
                )
                registered = await http.post("/retailcrm-admin/api/register/0367")
                module_after_register = crm.state()["accounts"]["test"]["modules"][
                    "vochi-telephony"
                ]
                deleted = await http.delete("/api/config/0367")
                after = await http.get("/api/config/0367")
            await svc.runtime.logs.flush()
        module_after_delete = crm.state()["accounts"]["test"]["modules"]["vochi-telephony"]

    assert tested.status_code == 200
    report = tested.json()
    assert report["ok"] is True
    assert report["telephony_access"] is True
    assert "telephony_write" in report["scopes"]
    assert wrong.status_code == 200
    assert wrong.json()["ok"] is False
    assert wrong.json()["error"] == {
        "kind": "auth",
        "status": 403,
        "message": 'Wrong "apiKey" value.',
    }

    assert registered.status_code == 200
    assert module_after_register["module"]["active"] is True
    assert deleted.status_code == 200
    assert deleted.json()["module_deactivated"] is True
    assert deleted.json()["deleted"] is True
    assert module_after_delete["module"]["active"] is False
    assert after.json()["configured"] is False
    doc = json.loads(
        await db.fetchval("SELECT integrations_config FROM enterprises WHERE number='0367'")
    )
    assert "retailcrm" not in doc
    events = await db.fetch(
        "SELECT event_type, status FROM integration_logs WHERE enterprise_number = '0367'"
        " ORDER BY id"
    )
    assert [(e["event_type"], e["status"]) for e in events] == [
        ("test_connection", "success"),
        ("test_connection", "error"),
        ("register_module", "success"),
        ("delete_module", "success"),
    ]


async def test_refused_registration_reports_the_field_errors(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367")
    async with AsyncSandboxServer(rate_limit=False, demo_data=False) as crm:
        crm.add_fault(endpoint="integration-modules/*", mode="error", status=500)
        async with running_service(service_settings(database_url)) as svc:
            async with httpx.AsyncClient(base_url=svc.url) as http:
                await http.put("/api/config/0367", json={"domain": crm.url, "api_key": crm.api_key})
                refused = await http.post("/retailcrm-admin/api/register/0367")
                unconfigured = await http.post("/retailcrm-admin/api/register/0999")
            await svc.runtime.logs.flush()
    assert refused.status_code == 502
    assert refused.json()["error"]["retailcrm"]["kind"] == "unavailable"
    assert unconfigured.status_code == 404
    row = await db.fetchrow(
        "SELECT status FROM integration_logs WHERE event_type = 'register_module'"
    )
    assert row["status"] == "error"


async def test_register_without_a_saved_config_is_a_conflict(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": {"enabled": True}})
    settings = service_settings(database_url)
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as http:
        response = await http.post("/retailcrm-admin/api/register/0367")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_configured"
