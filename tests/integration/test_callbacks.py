"""RetailCRM's callbacks end to end: the sandbox clicks and changes statuses, the real service
answers, and click-to-call reaches a real sshd's recording ``asterisk`` stub."""

from __future__ import annotations

import secrets

import asyncpg

from retailcrm_service.api.callbacks import CallbackLimiter
from retailcrm_service.sandbox import AsyncSandboxServer
from tests.support.crm_stack import PHONE, Stack, add_enterprise, sandbox, service
from tests.support.sshd import SshServer, ssh_fixture, sshd_fixture  # noqa: F401
from vochi_crm_client.testing import FakeClock

MANAGER = {"id": 7, "firstName": "Ann", "lastName": "Lee", "status": "free"}
CUSTOMER = {"id": 15, "firstName": "Ivan", "lastName": "Petrov"}
ORIGINATE = "channel originate LOCAL/150@web-originate application Dial LOCAL/{}@inoffice"


async def register_module(stack: Stack, client_id: str) -> None:
    """What the admin's "connect" does: the module with our callback URLs and codes."""
    module = {
        "code": "vochi-telephony",
        "integrationCode": "vochi-telephony",
        "active": True,
        "name": "Vochi-CRM",
        "logo": f"{stack.svc.url}/retailcrm-admin/static/logo.svg",
        "baseUrl": stack.svc.url,
        "clientId": client_id,
        "integrations": {
            "telephony": {
                "makeCallUrl": f"{stack.svc.url}/retailcrm/make-call",
                "changeUserStatusUrl": f"{stack.svc.url}/retailcrm/status",
                "allowEdit": False,
                "inputEventSupported": True,
                "outputEventSupported": True,
                "hangupEventSupported": True,
                "additionalCodes": [{"userId": 7, "code": "150"}],
            }
        },
    }
    client = stack.svc.runtime.retailcrm(await stack.svc.runtime.configs.get("0367"))
    await client.edit_integration_module(module)


async def setup(db: asyncpg.Connection, crm: AsyncSandboxServer, key: str) -> str:
    """Enterprise 0367 on the sandbox account (user 7 is extension 150); returns its clientId."""
    client_id = secrets.token_urlsafe(32)
    await add_enterprise(db, "0367", crm, key, extensions={"7": "150"}, client_id=client_id)
    return client_id


async def test_click_to_call_from_retailcrm_reaches_asterisk_as_the_originate_command(
    db: asyncpg.Connection, database_url: str, ssh: SshServer
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        client_id = await setup(db, crm, key)
        async with service(database_url, ssh) as stack:
            await register_module(stack, client_id)
            callback = await crm.control.click_to_call(user_id=7, phone="+375 29 765-43-21")
            await stack.settle_jobs()
            posted = await crm.control.click_to_call(user_id=7, phone="375447034448", method="POST")
            await stack.settle_jobs()
            calls = ssh.calls()
            journal = await db.fetch(
                "SELECT status FROM integration_logs WHERE event_type = 'click_to_call'"
            )
    assert callback["status"] == 200
    assert posted["status"] == 200
    assert calls == [
        ["asterisk", "-rx", ORIGINATE.format("+375297654321")],
        ["asterisk", "-rx", ORIGINATE.format("375447034448")],
    ]
    assert [r["status"] for r in journal] == ["success", "success"]


async def test_unknown_client_id_gets_401_and_reaches_nothing(
    db: asyncpg.Connection, database_url: str, ssh: SshServer
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        await setup(db, crm, key)
        async with service(database_url, ssh) as stack:
            # The sandbox's module carries a clientId we never issued.
            await register_module(stack, secrets.token_urlsafe(32))
            callback = await crm.control.click_to_call(user_id=7, phone=PHONE)
            direct = await stack.http.get(
                "/retailcrm/make-call", params={"code": "150", "phone": PHONE}
            )
            status = await stack.http.post(
                "/retailcrm/status", data={"clientId": "x" * 43, "userId": "7", "status": "busy"}
            )
            asterisk = stack.svc.runtime.asterisk
            jobs = asterisk.stats()["jobs_started"]
    assert callback["status"] == 401
    assert direct.status_code == 401
    assert direct.json()["error"]["code"] == "unauthorized"
    assert status.status_code == 401
    assert jobs == 0
    assert ssh.calls() == []


async def test_hostile_phone_in_a_click_is_refused_before_any_ssh(
    db: asyncpg.Connection, database_url: str, ssh: SshServer
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        client_id = await setup(db, crm, key)
        async with service(database_url, ssh) as stack:
            bad_phone = await stack.http.get(
                "/retailcrm/make-call",
                params={"clientId": client_id, "code": "150", "phone": "375291234567;reboot"},
            )
            bad_code = await stack.http.get(
                "/retailcrm/make-call",
                params={"clientId": client_id, "code": "150 && id", "phone": PHONE},
            )
    assert bad_phone.status_code == 422
    assert "phone" in bad_phone.json()["error"]["fields"]
    assert bad_code.status_code == 422
    assert ssh.calls() == []


async def test_click_to_call_is_rate_limited_per_client_id(
    db: asyncpg.Connection, database_url: str, ssh: SshServer
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        client_id = await setup(db, crm, key)
        async with service(database_url, ssh) as stack:
            clock = FakeClock()
            stack.svc.app.state.callback_limiter = CallbackLimiter(rate=1, burst=2, clock=clock)
            params = {"clientId": client_id, "code": "150", "phone": PHONE}
            replies = [
                await stack.http.get("/retailcrm/make-call", params=params) for _ in range(3)
            ]
            clock.advance(1)
            after = await stack.http.get("/retailcrm/make-call", params=params)
            await stack.settle_jobs()
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert replies[2].headers["retry-after"] == "1"
    assert after.status_code == 200
    assert len(ssh.calls()) == 3


async def test_status_changes_are_recorded_and_steer_smart_redirect(
    db: asyncpg.Connection, database_url: str
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        client_id = await setup(db, crm, key)
        async with service(database_url) as stack:
            await register_module(stack, client_id)
            before = await stack.http.post(
                "/api/smart-redirect", json={"enterprise_number": "0367", "phone": PHONE}
            )
            callback = await crm.control.set_user_status(user_id=7, status="dinner")
            after = await stack.http.post(
                "/api/smart-redirect", json={"enterprise_number": "0367", "phone": PHONE}
            )
            listed = await stack.http.get("/api/user-status/0367")
            invalid = await stack.http.get(
                "/retailcrm/status", params={"clientId": client_id, "userId": "7", "status": "nap"}
            )
    assert callback is not None
    assert callback["status"] == 200
    assert before.json()["extension"] == "150"
    assert (after.json()["extension"], after.json()["source"]) == (None, "manager_dinner")
    assert listed.json()["statuses"] == {"7": "dinner"}
    assert invalid.status_code == 422
    row = await db.fetchrow("SELECT code, status FROM retailcrm_user_status")
    assert dict(row) == {"code": "150", "status": "dinner"}


async def test_callbacks_of_a_disabled_integration_are_refused(
    db: asyncpg.Connection, database_url: str, ssh: SshServer
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        client_id = await setup(db, crm, key)
        await db.execute(
            """UPDATE enterprises SET integrations_config = jsonb_set(
                   integrations_config, '{retailcrm,enabled}', 'false') WHERE number = '0367'"""
        )
        async with service(database_url, ssh) as stack:
            reply = await stack.http.get(
                "/retailcrm/make-call",
                params={"clientId": client_id, "code": "150", "phone": PHONE},
            )
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "disabled"
    assert ssh.calls() == []
