"""Smart redirect end to end: the real service, PostgreSQL, the RetailCRM sandbox and sshd."""

from __future__ import annotations

import asyncio
import json
import secrets

import asyncpg
import httpx

from retailcrm_service.sandbox import AsyncSandboxServer, mask
from retailcrm_service.telephony.smart_redirect import RateLimit
from tests.support.crm_stack import PHONE, Stack, account, add_enterprise, sandbox, service
from tests.support.sshd import SshServer, ssh_fixture, sshd_fixture  # noqa: F401
from tests.unit.test_dialplan import macro_cut

TRUNK = "0001363"


async def internal_phone_id(db: asyncpg.Connection, number: str, ext: str) -> int:
    value = await db.fetchval(
        "SELECT id FROM user_internal_phones WHERE enterprise_number = $1 AND phone_number = $2",
        number,
        ext,
    )
    assert value is not None
    return int(value)


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
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
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
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
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


async def test_slow_retailcrm_fails_open_within_the_deadline_and_the_lookup_is_cancelled(
    db: asyncpg.Connection, database_url: str
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        row = await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        await crm.control.add_fault(endpoint="telephony/manager", mode="latency", latency_ms=2000)
        async with service(database_url) as stack:
            reply = await getcustomerdata(stack, row["name2"])
            assert reply.json() == {"Name": "", "DialPlan": None}
            assert stack.smart.stats()["timeouts"] == 1
            # The lookup ended with the decision that started it: nothing keeps a slot of the
            # key's budget for an answer nobody waits for.
            for _ in range(50):
                if not stack.smart.stats()["cache"]["inflight"]:
                    break
                await asyncio.sleep(0.02)
            stats = stack.smart.stats()
            assert stats["cache"]["inflight"] == 0
            assert stats["lookups_cancelled"] == 1
            # So nothing was cached: while RetailCRM stays slow every call fails open ...
            again = await getcustomerdata(stack, row["name2"])
            assert again.json() == {"Name": "", "DialPlan": None}
            assert stack.smart.stats()["lookups_cancelled"] == 2
            # ... and once it answers in time, the call is routed.
            await crm.control.clear_faults()
            routed = await getcustomerdata(stack, row["name2"])
            assert json.loads(routed.text)["DialPlan"] is not None


async def test_the_dialplan_route_is_rate_limited_per_token_and_fails_open(
    db: asyncpg.Connection, database_url: str
) -> None:
    key = secrets.token_hex(16)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        noisy = await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        quiet = await add_enterprise(db, "0368", crm, key, extensions={"7": "150"})
        async with service(database_url) as stack:
            stack.smart.limit = RateLimit(rate=0.001, burst=3)
            replies = [
                await getcustomerdata(stack, noisy["name2"], f"+37529{i:07}") for i in range(5)
            ]
            other = await getcustomerdata(stack, quiet["name2"])
            stats = stack.smart.stats()
        state = await crm.control.state()
    assert [r.status_code for r in replies] == [200, 200, 200, 429, 429]
    for reply in replies[3:]:
        assert macro_cut(reply.text) == ("", "")  # no name, no Goto
        assert reply.json()["error"]["code"] == "rate_limited"
    assert other.status_code == 200
    assert json.loads(other.text)["DialPlan"] is not None
    assert stats["rate_limited"] == 2
    # refused requests started no lookup
    lookups = [r for r in state["requests"] if r["path"].endswith("/telephony/manager")]
    assert len(lookups) == 4


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
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
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
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
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
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
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
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        row = await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        async with service(database_url) as stack:
            replies = [
                await getcustomerdata(stack, token)
                for token in (row["name2"], row["secret"], row["number"])
            ]
    assert len({r.text for r in replies}) == 1
    assert all(r.status_code == 200 for r in replies)
    assert json.loads(replies[0].text)["DialPlan"] is not None


async def test_a_token_unknown_until_it_is_given_to_an_enterprise_resolves_at_once(
    db: asyncpg.Connection, database_url: str
) -> None:
    """The dialplan's Token cache follows token changes (NOTIFY "*"): a negative entry does not
    outlive the change that makes the token valid."""
    key = secrets.token_hex(16)
    fresh = "new-token-" + secrets.token_hex(8)
    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        async with service(database_url) as stack:
            assert (await getcustomerdata(stack, fresh)).status_code == 401  # cached negatively
            await db.execute("UPDATE enterprises SET name2 = $1 WHERE number = '0367'", fresh)
            for _ in range(100):  # far shorter than the 30 s negative TTL
                reply = await getcustomerdata(stack, fresh)
                if reply.status_code == 200:
                    break
                await asyncio.sleep(0.05)
    assert reply.status_code == 200
    assert json.loads(reply.text)["DialPlan"] is not None
