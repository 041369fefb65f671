"""The smart-redirect and callback stack: a RetailCRM sandbox account whose customer belongs to a
manager, an enterprise wired to it, and the real service with smart redirect (and Asterisk over
a test sshd when one is given).

    async with sandbox(key, manager=MANAGER, customer=CUSTOMER) as crm:
        row = await add_enterprise(db, "0367", crm, key, extensions={"7": "150"})
        async with service(database_url, ssh) as stack:
            await stack.http.post("/api/smart-redirect", json={...})
            await stack.settle_jobs()
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from retailcrm_service.sandbox import AsyncSandboxServer
from retailcrm_service.telephony.smart_redirect import SmartRedirect
from tests.support.pg import create_enterprise
from tests.support.service import RunningService, running_service, service_settings
from tests.support.sshd import SshServer

PHONE = "+375291234567"


def account(name: str, key: str, *, manager: dict[str, Any], customer: dict[str, Any]) -> dict:
    """A sandbox account: one manager, and one customer of theirs who calls from ``PHONE``."""
    return {
        "name": name,
        "api_key": key,
        "demo": False,
        "users": [manager],
        "customers": [{**customer, "managerId": manager["id"], "phones": [PHONE]}],
    }


def sandbox(key: str, *, manager: dict[str, Any], customer: dict[str, Any]) -> AsyncSandboxServer:
    """The sandbox (no rate limit) with the one account ``acme`` of ``key``."""
    return AsyncSandboxServer(
        accounts=[account("acme", key, manager=manager, customer=customer)], rate_limit=False
    )


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


@dataclass
class Stack:
    svc: RunningService
    http: httpx.AsyncClient

    async def settle_jobs(self) -> None:
        """Wait for background SSH jobs to finish, then for their journal rows to be stored."""
        asterisk = self.svc.runtime.asterisk
        for _ in range(400):
            if asterisk is None or not asterisk.stats()["background_jobs"]:
                break
            await asyncio.sleep(0.025)
        await self.svc.runtime.logs.flush()

    @property
    def smart(self) -> SmartRedirect:
        return self.svc.runtime.need_smart_redirect()


@asynccontextmanager
async def service(database_url: str, ssh: SshServer | None = None) -> AsyncIterator[Stack]:
    parts = {"smart_redirect"}
    overrides: dict[str, Any] = {}
    if ssh is not None:
        parts.add("asterisk")
        overrides["asterisk"] = ssh.settings()
    settings = service_settings(database_url, **overrides)
    async with (
        running_service(settings, parts=parts) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as http,
    ):
        yield Stack(svc, http)
