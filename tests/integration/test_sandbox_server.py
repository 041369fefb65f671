"""The sandbox as a real server: runners, the HTTP control API, callbacks and the CLI process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from retailcrm_service.sandbox import AsyncSandboxServer, SandboxServer
from tests.support.procs import free_port
from tests.support.service import serving

pytestmark = pytest.mark.anyio

SECRET = "client-id-0123456789abcdef0123"


class Receiver:
    """A real HTTP endpoint standing in for the integration: records what RetailCRM sends."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

        async def record(request: Request) -> JSONResponse:
            form = dict(await request.form()) if request.method == "POST" else {}
            self.seen.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": dict(request.query_params),
                    "form": form,
                }
            )
            return JSONResponse({"success": True})

        self.app = Starlette(routes=[Route("/{p:path}", record, methods=["GET", "POST"])])


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    target = Receiver()
    async with serving(target.app, lifespan="off") as url:
        yield target, url


def module(base: str) -> dict[str, Any]:
    return {
        "code": "acme-pbx",
        "active": True,
        "name": "Acme PBX",
        "logo": f"{base}/logo.svg",
        "baseUrl": base,
        "clientId": SECRET,
        "actions": {"activity": "/actions/activity"},
        "accountUrl": f"{base}/retailcrm/account",
        "integrations": {
            "telephony": {
                "makeCallUrl": f"{base}/retailcrm/make-call",
                "changeUserStatusUrl": f"{base}/retailcrm/status",
                "additionalCodes": [{"userId": 1, "code": "150"}],
                "externalPhones": [{"siteCode": "main", "externalPhone": "+375170000000"}],
            }
        },
    }


async def register(crm: AsyncSandboxServer, base: str) -> None:
    async with httpx.AsyncClient(base_url=crm.url, headers={"X-API-KEY": crm.api_key}) as http:
        reply = await http.post(
            "/api/v5/integration-modules/acme-pbx/edit",
            data={"integrationModule": json.dumps(module(base))},
        )
        assert reply.status_code == 201


async def test_click_to_call_reaches_make_call_url_by_get_and_by_post(
    receiver: tuple[Receiver, str],
) -> None:
    target, base = receiver
    async with AsyncSandboxServer(rate_limit=False) as crm:
        await register(crm, base)
        record = await crm.control.click_to_call(user_id=1, phone="+375291234567")
        await crm.control.click_to_call(user_id=1, phone="+375291234567", method="POST")
        expected = {
            "clientId": SECRET,
            "code": "150",
            "phone": "+375291234567",
            "userId": "1",
            "externalPhone": "+375170000000",
        }
        assert target.seen[0] == {
            "method": "GET",
            "path": "/retailcrm/make-call",
            "query": expected,
            "form": {},
        }
        assert target.seen[1]["method"] == "POST"
        assert target.seen[1]["form"] == expected
        assert record["status"] == 200
        assert record["response"] == '{"success":true}'
        assert record["params"]["clientId"] == "***0123"
        callbacks = (await crm.control.state())["callbacks"]
        assert [c["method"] for c in callbacks] == ["GET", "POST"]


async def test_status_change_updates_the_user_and_notifies(receiver: tuple[Receiver, str]) -> None:
    target, base = receiver
    async with AsyncSandboxServer(rate_limit=False) as crm:
        await register(crm, base)
        record = await crm.control.set_user_status(user_id=1, status="dinner")
        assert record is not None
        assert target.seen == [
            {
                "method": "GET",
                "path": "/retailcrm/status",
                "query": {"clientId": SECRET, "userId": "1", "code": "150", "status": "dinner"},
                "form": {},
            }
        ]
        state = await crm.control.state()
        assert state["accounts"]["test"]["users"][0]["status"] == "dinner"


async def test_activity_and_account_url_callbacks_post_the_client_id(
    receiver: tuple[Receiver, str],
) -> None:
    target, base = receiver
    async with AsyncSandboxServer(rate_limit=False) as crm:
        await register(crm, base)
        await crm.control.activity(code="acme-pbx", active=False, freeze=True)
        seen = target.seen[0]
        assert (seen["method"], seen["path"]) == ("POST", "/actions/activity")
        assert seen["form"]["clientId"] == SECRET
        assert json.loads(seen["form"]["activity"]) == {"active": False, "freeze": True}
        assert seen["form"]["systemUrl"] == crm.url
        link = await crm.control.account_url(code="acme-pbx")
        assert link["status"] == 200
        assert target.seen[1] == {
            "method": "POST",
            "path": "/retailcrm/account",
            "query": {},
            "form": {"clientId": SECRET},
        }
        async with httpx.AsyncClient(base_url=crm.url, headers={"X-API-KEY": crm.api_key}) as http:
            event = {"phone": "+1", "type": "in"}
            reply = await http.post(
                "/api/v5/telephony/call/event", data={"event": json.dumps(event)}
            )
            assert reply.json()["errorMsg"] == "Telephony not enabled"


async def test_an_unreachable_callback_target_is_recorded_as_an_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
    async with AsyncSandboxServer(rate_limit=False) as crm:
        await register(crm, dead)
        record = await crm.control.click_to_call(user_id=1, phone="+1")
        assert record["status"] is None
        assert record["error"].startswith("ConnectError")
    sock.close()


async def test_control_api_errors_are_json_4xx() -> None:
    async with (
        AsyncSandboxServer(rate_limit=False) as crm,
        httpx.AsyncClient(base_url=crm.url) as http,
    ):
        reply = await http.post(
            "/_sandbox/callbacks/click-to-call", json={"userId": 1, "phone": "1"}
        )
        assert reply.status_code == 409
        assert reply.json()["error"]["code"] == "no_telephony_module"
        reply = await http.post("/_sandbox/seed", content=b"{not json")
        assert reply.status_code == 400
        reply = await http.post("/_sandbox/faults", json={"endpoint": "nothing/*"})
        assert reply.status_code == 422


def test_threaded_server_control_api_seed_faults_settings_reset() -> None:
    frozen_clock = 50.0  # every request lands in the same instant: a deterministic window
    with SandboxServer(rate_limit=False, demo_data=False, clock=lambda: frozen_clock) as crm:
        http = httpx.Client(base_url=crm.url, headers={"X-API-KEY": crm.api_key})
        assert http.get("/api/v5/users").json()["pagination"]["totalCount"] == 0
        crm.control.seed({"name": "test", "users": [{"id": 9, "firstName": "Nine"}]})
        assert http.get("/api/v5/users/9").json()["user"]["firstName"] == "Nine"
        crm.control.seed({"name": "other", "api_key": "other-key-0123456789", "demo": True})
        other = http.get("/api/v5/users", headers={"X-API-KEY": "other-key-0123456789"})
        assert other.json()["pagination"]["totalCount"] == 5
        crm.control.add_fault(endpoint="users/*", status=503, times=1)
        assert http.get("/api/v5/users/9").status_code == 503
        assert http.get("/api/v5/users/9").status_code == 200
        crm.control.settings(account_missing=True)
        assert http.get("/api/v5/users/9").json()["errorMsg"] == "Account does not exist."
        crm.control.settings(account_missing=False, rate_limit=True)
        statuses = [http.get("/api/v5/users/9").status_code for _ in range(11)]
        assert statuses == [200] * 10 + [503]
        crm.control.reset()
        state = crm.control.state()
        assert list(state["accounts"]) == ["test"]
        assert state["requests"] == []
        assert http.get("/api/v5/users/9").json()["errorMsg"] == "Not found"
        http.close()


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("retailcrm-service")
    return [str(script)] if script.exists() else [sys.executable, "-m", "retailcrm_service"]


def test_cli_sandbox_prints_the_demo_key_and_serves_its_state() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*_cli(), "sandbox", "--port", str(port), "--no-rate-limit"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        key = None
        while key is None:
            line = proc.stdout.readline()
            assert line, "the sandbox exited before printing its key"
            if line.startswith("demo account API key: "):
                key = line.split(": ", 1)[1].strip()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                state = httpx.get(f"{url}/_sandbox/state", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the sandbox did not answer"
                time.sleep(0.05)
        assert list(state["accounts"]) == ["demo"]
        assert len(state["accounts"]["demo"]["users"]) == 5
        users = httpx.get(f"{url}/api/v5/users/1", headers={"X-API-KEY": key}).json()
        assert users["success"] is True
        assert key not in httpx.get(f"{url}/_sandbox/state").text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert key not in err


def test_a_bad_seed_document_changes_nothing() -> None:
    with SandboxServer(rate_limit=False, demo_data=False) as crm:
        bad = [{"name": "new", "api_key": "new-key-0123456789"}, {"name": "x", "users": [5]}]
        reply = httpx.post(f"{crm.url}/_sandbox/seed", json={"accounts": bad})
        assert reply.status_code == 422
        assert reply.json()["error"]["code"] == "invalid_document"
        reply = httpx.post(
            f"{crm.url}/_sandbox/seed", json={"accounts": [{"name": "y", "users": [{"id": "z"}]}]}
        )
        assert reply.status_code == 422
        assert list(crm.control.state()["accounts"]) == ["test"]
        users = httpx.get(f"{crm.url}/api/v5/users/1", headers={"X-API-KEY": "new-key-0123456789"})
        assert users.json()["errorMsg"] == 'Wrong "apiKey" value.'
