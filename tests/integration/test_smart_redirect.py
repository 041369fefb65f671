"""Smart redirect end to end: the real service, PostgreSQL, the RetailCRM sandbox and sshd."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from retailcrm_service.asterisk import AsteriskControl
from retailcrm_service.sandbox import AsyncSandboxServer, mask
from retailcrm_service.smart_redirect import SmartRedirect, smart_redirect_component
from tests.support.pg import create_enterprise
from tests.support.service import RunningService, running_service, service_settings
from tests.support.sshd import SshServer
from tests.unit.test_dialplan import macro_cut

PHONE = "+375291234567"
TRUNK = "0001363"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer.start(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def ssh(sshd: SshServer) -> SshServer:
    sshd.reset()
    return sshd


def account(name: str, key: str, *, manager: dict[str, Any], customer: dict[str, Any]) -> dict:
    return {
        "name": name,
        "api_key": key,
        "demo": False,
        "users": [manager],
        "customers": [{**customer, "managerId": manager["id"], "phones": [PHONE]}],
    }


async def add_enterprise(
    db: asyncpg.Connection,
    number: str,
    crm: AsyncSandboxServer,
    key: str,
    *,
    extensions: dict[str, str],
    smart: dict[str, Any] | None = None,
    client_id: str | None = None,
) -> dict[str, Any]:
    row = await create_enterprise(
        db,
        number,
        integrations={
            "retailcrm": {
                "enabled": True,
                "domain": crm.url,
                "api_key": key,
                "user_extensions": extensions,
                "clientId": client_id or secrets.token_urlsafe(32),
                "smart_redirect": smart or {},
            }
        },
    )
    for ext in extensions.values():
        await db.execute(
            "INSERT INTO user_internal_phones (phone_number, enterprise_number) VALUES ($1, $2)",
            ext,
            number,
        )
    return row


async def internal_phone_id(db: asyncpg.Connection, number: str, ext: str) -> int:
    value = await db.fetchval(
        "SELECT id FROM user_internal_phones WHERE enterprise_number = $1 AND phone_number = $2",
        number,
        ext,
    )
    assert value is not None
    return int(value)


@dataclass
class Stack:
    svc: RunningService
    http: httpx.AsyncClient

    async def settle_jobs(self) -> None:
        """Wait for background SSH jobs to finish, then for their journal rows to be stored."""
        asterisk = self.svc.runtime.components.get("asterisk")
        for _ in range(400):
            if asterisk is None or not asterisk.stats()["background_jobs"]:
                break
            await asyncio.sleep(0.025)
        await self.svc.runtime.logs.flush()

    @property
    def smart(self) -> SmartRedirect:
        smart = self.svc.runtime.components["smart_redirect"]
        assert isinstance(smart, SmartRedirect)
        return smart


@asynccontextmanager
async def service(database_url: str, ssh: SshServer | None = None) -> AsyncIterator[Stack]:
    components: list[Any] = []
    if ssh is not None:
        components.append(("asterisk", lambda runtime: AsteriskControl(settings=ssh.settings())))
    components.append(("smart_redirect", smart_redirect_component))
    settings = service_settings(database_url)
    async with (
        running_service(settings, components=components) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
    ):
        yield Stack(svc, http)


async def getcustomerdata(stack: Stack, token: str, phone: str = PHONE) -> httpx.Response:
    return await stack.http.post(
        "/api/callevent/getcustomerdata",
        headers={"Token": token},
        json={"UniqueId": "1764150000.101", "Phone": phone, "TrunkId": TRUNK},
    )


MANAGER = {"id": 7, "firstName": 'Ann, "The Boss"', "lastName": "Lee,", "status": "free"}
CUSTOMER = {"id": 15, "firstName": 'Ivan "Vanya"', "lastName": "Petrov, Jr."}


async def test_dialplan_reply_names_the_managers_context_and_survives_the_macro(
    db: asyncpg.Connection, database_url: str
) -> None:
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        row = await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        phone_id = await internal_phone_id(db, "0367", "150")
        async with service(database_url) as stack:
            reply = await getcustomerdata(stack, row["name2"])
    assert reply.status_code == 200
    text = reply.text
    assert text.startswith('{"Name":"')
    assert json.loads(text) == {
        "Name": "Petrov Jr. Ivan Vanya",
        "DialPlan": f"mngr{phone_id}_{TRUNK}_1",
    }
    assert macro_cut(text) == ("Petrov Jr. Ivan Vanya", f"mngr{phone_id}_{TRUNK}_1")


async def test_smart_redirect_reply_sanitises_the_managers_name(
    db: asyncpg.Connection, database_url: str
) -> None:
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        async with service(database_url) as stack:
            reply = await stack.http.post(
                "/api/smart-redirect",
                json={"enterprise_number": "0367", "phone": PHONE, "trunk": TRUNK},
            )
    assert reply.status_code == 200
    body = reply.json()
    assert body["manager_name"] == "Lee Ann The Boss"
    assert {k: body[k] for k in ("extension", "manager_id", "source", "redirect")} == {
        "extension": "150",
        "manager_id": 7,
        "source": "telephony_manager",
        "redirect": "skipped",
    }


async def test_slow_retailcrm_fails_open_within_the_deadline_then_the_answer_is_cached(
    db: asyncpg.Connection, database_url: str
) -> None:
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        row = await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        await crm.control.add_fault(endpoint="telephony/manager", mode="latency", latency_ms=2000)
        async with service(database_url) as stack:
            started = time.monotonic()
            reply = await getcustomerdata(stack, row["name2"])
            elapsed = time.monotonic() - started
            assert reply.json() == {"Name": "", "DialPlan": None}
            assert stack.smart.stats()["timeouts"] == 1
            assert elapsed < 2.0, "the reply waited for RetailCRM instead of failing open"
            # The lookup went on in the background; once it lands, the caller's retry is routed.
            while stack.smart.stats()["cache"]["inflight"]:
                await asyncio.sleep(0.05)
            again = await getcustomerdata(stack, row["name2"])
            assert json.loads(again.text)["DialPlan"] is not None
            assert stack.smart.stats()["cache"]["hits"] == 1


async def test_each_enterprise_is_looked_up_with_its_own_retailcrm_account(
    db: asyncpg.Connection, database_url: str
) -> None:
    key_a, key_b = secrets.token_hex(16), secrets.token_hex(16)
    accounts = [
        account("acme", key_a, manager={"id": 7, "firstName": "Ann"}, customer={"id": 15}),
        account("globex", key_b, manager={"id": 9, "firstName": "Bob"}, customer={"id": 16}),
    ]
    async with AsyncSandboxServer(accounts=accounts, rate_limit=False) as crm:
        await add_enterprise(db, "0367", crm, key_a, extensions={"7": "150"})
        await add_enterprise(db, "0368", crm, key_b, extensions={"9": "151"})
        async with service(database_url) as stack:
            answers = {}
            for number in ("0367", "0368"):
                reply = await stack.http.post(
                    "/api/smart-redirect", json={"enterprise_number": number, "phone": PHONE}
                )
                answers[number] = (reply.json()["manager_id"], reply.json()["extension"])
        state = await crm.control.state()
    assert answers == {"0367": (7, "150"), "0368": (9, "151")}
    lookups = [r for r in state["requests"] if r["path"].endswith("/telephony/manager")]
    assert sorted(r["auth"]["key"] for r in lookups) == sorted([mask(key_a), mask(key_b)])


async def test_redirect_mode_moves_the_channel_in_the_background_and_journals_it(
    db: asyncpg.Connection, database_url: str, ssh: SshServer
) -> None:
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        await add_enterprise(
            db, "0367", crm, key, extensions={"7": "150"}, smart={"redirect_channel": True}
        )
        async with service(database_url, ssh) as stack:
            reply = await stack.http.post(
                "/api/smart-redirect",
                json={
                    "enterprise_number": "0367",
                    "phone": PHONE,
                    "call_unique_id": "1764150000.101",
                    "channel": "SIP/0001363-0000a1b2",
                },
            )
            assert reply.json()["redirect"] == "scheduled"
            await stack.settle_jobs()
            rows = await db.fetch(
                "SELECT status, call_unique_id FROM integration_logs WHERE event_type = $1",
                "channel_redirect",
            )
    assert ssh.calls() == [
        ["asterisk", "-rx", "channel redirect SIP/0001363-0000a1b2 inoffice,150,1"]
    ]
    assert [(r["status"], r["call_unique_id"]) for r in rows] == [("success", "1764150000.101")]


async def test_redirect_is_skipped_unless_the_enterprise_enables_it(
    db: asyncpg.Connection, database_url: str, ssh: SshServer
) -> None:
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        async with service(database_url, ssh) as stack:
            reply = await stack.http.post(
                "/api/smart-redirect",
                json={"enterprise_number": "0367", "phone": PHONE, "channel": "SIP/1-0000a1b2"},
            )
    assert reply.json()["redirect"] == "skipped"
    assert ssh.calls() == []


async def test_bad_requests_get_clear_errors(db: asyncpg.Connection, database_url: str) -> None:
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        async with service(database_url) as stack:
            hostile = await stack.http.post(
                "/api/smart-redirect",
                json={"enterprise_number": "0367", "phone": PHONE, "channel": "SIP/1;reboot"},
            )
            broken = await stack.http.post("/api/smart-redirect", content=b"{not json")
            unknown = await getcustomerdata(stack, "no-such-token")
            no_token = await stack.http.post(
                "/api/callevent/getcustomerdata", json={"Phone": PHONE}
            )
    assert hostile.status_code == 422
    assert "channel" in hostile.json()["error"]["fields"]
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"
    for reply in (unknown, no_token):
        assert reply.status_code == 401
        assert reply.text.startswith('{"Name":"","DialPlan":null,')
        assert macro_cut(reply.text)[1] == ""


async def test_the_dialplan_token_may_be_name2_secret_or_number(
    db: asyncpg.Connection, database_url: str
) -> None:
    key = secrets.token_hex(16)
    async with AsyncSandboxServer(
        accounts=[account("acme", key, manager=MANAGER, customer=CUSTOMER)], rate_limit=False
    ) as crm:
        row = await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        async with service(database_url) as stack:
            replies = [
                await getcustomerdata(stack, token)
                for token in (row["name2"], row["secret"], row["number"])
            ]
    assert len({r.text for r in replies}) == 1
    assert all(r.status_code == 200 for r in replies)
    assert json.loads(replies[0].text)["DialPlan"] is not None
