"""``retailcrm-service demo``: the whole system on one machine, for a first look.

It starts (or joins) the embedded PostgreSQL, applies the migrations, seeds two demo
enterprises and prints their enablement matrix; starts the RetailCRM sandbox, the RetailCRM
service and the reference call service as real processes; connects the first enterprise to the
sandbox and registers its telephony module; plays one incoming call through the call service and
shows what reached the sandbox; then waits for Ctrl-C and stops the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx

from retailcrm_service.crm.mapping import DEFAULT_TIMEZONE
from retailcrm_service.security.secrets import mask
from retailcrm_service.settings import data_dir_from, database_url_from
from retailcrm_service.storage.database import database_url, migrate, redact_dsn

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoEnterprise:
    number: str
    name: str
    token: str
    secret: str
    integrations: dict[str, dict[str, object]]


DEMO_ENTERPRISES: tuple[DemoEnterprise, ...] = (
    DemoEnterprise(
        number="0367",
        name="Демо: Интернет-магазин",
        token="375291110001",  # noqa: S106 - demo data, not a secret
        secret="5f2b8c1e9d4a7f3b6c0e1d2a3b4c5d6e",  # noqa: S106 - demo data
        integrations={"retailcrm": {"enabled": True}, "uon": {"enabled": False}},
    ),
    DemoEnterprise(
        number="0368",
        name="Демо: Турагентство",
        token="375291110002",  # noqa: S106 - demo data, not a secret
        secret="a1b2c3d4e5f60718293a4b5c6d7e8f90",  # noqa: S106 - demo data
        integrations={"retailcrm": {"enabled": False}, "uon": {"enabled": True}},
    ),
)


async def seed_enterprises(dsn: str, enterprises: Sequence[DemoEnterprise]) -> None:
    """Create the demo enterprises; existing ones (and an admin's changes to them) are kept."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for ent in enterprises:
                await conn.execute(
                    """INSERT INTO enterprises
                           (number, name, name2, secret, ip, active, integrations_config)
                       VALUES ($1, $2, $3, $4, '127.0.0.1', true, $5::jsonb)
                       ON CONFLICT (number) DO NOTHING""",
                    ent.number,
                    ent.name,
                    ent.token,
                    ent.secret,
                    json.dumps(ent.integrations),
                )
    finally:
        await conn.close()


DEMO_EXTENSIONS: dict[str, str] = {"1": "150", "2": "151", "3": "152"}
"""Sandbox demo users (RetailCRM ids) -> the demo enterprise's extensions."""


async def seed_extensions(dsn: str, number: str, extensions: Mapping[str, str]) -> None:
    """The enterprise's extensions in ``user_internal_phones`` (smart redirect maps to them)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for ext in sorted(extensions.values()):
                await conn.execute(
                    """INSERT INTO user_internal_phones (phone_number, enterprise_number)
                       SELECT $1, $2 WHERE NOT EXISTS (
                           SELECT 1 FROM user_internal_phones
                           WHERE phone_number = $1 AND enterprise_number = $2)""",
                    ext,
                    number,
                )
    finally:
        await conn.close()


class DemoError(RuntimeError):
    """The demo could not start a part of the system; the message says which and why."""


class _Child:
    """One child process of the demo, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        port: int,
        ready_path: str,
        log_dir: Path,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, http: httpx.AsyncClient, wait_seconds: float = 30.0) -> None:
        if not _port_is_free(self.port):
            raise DemoError(f"{self.name}: port {self.port} is taken (choose another with flags)")
        with self.log_path.open("ab") as log:
            # Popen returns at once; the children outlive no demo (killed on exit).
            self.proc = subprocess.Popen(  # noqa: S603, ASYNC220 - our own console scripts
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            with contextlib.suppress(httpx.HTTPError, ValueError):  # not listening yet
                response = await http.get(self.url + self.ready_path, timeout=1.0)
                if response.status_code < 500 or "status" in response.json():
                    return
            await asyncio.sleep(0.2)
        raise DemoError(
            f"{self.name} did not answer within {wait_seconds:.0f}s; see {self.log_path}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _script(name: str) -> str:
    """A console script of this installation (the venv's bin), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


class DemoSystem:
    """The sandbox, the RetailCRM service and the reference call service as real processes."""

    def __init__(self, dsn: str, ports: DemoPorts) -> None:
        self.dsn = dsn
        self.ports = ports
        self.data_dir = data_dir_from(os.environ).resolve()
        self.log_dir = self.data_dir / "logs"
        self.api_key = "demo_" + secrets.token_hex(16)
        self.service_url = f"http://127.0.0.1:{ports.service}"
        self.sandbox_url = f"http://127.0.0.1:{ports.sandbox}"
        self.call_service_url = f"http://127.0.0.1:{ports.call_service}"
        self.env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "RETAILCRM_DATA_DIR": str(self.data_dir),
            "RETAILCRM_ALLOW_HTTP": "1",
            "RETAILCRM_PUBLIC_URL": os.environ.get("RETAILCRM_PUBLIC_URL") or self.service_url,
            "PYTHONUNBUFFERED": "1",
        }
        self._children: list[_Child] = []
        self._http = httpx.AsyncClient(timeout=10.0)

    async def __aenter__(self) -> DemoSystem:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        service = _script("retailcrm-service")
        try:
            await self._start(
                "sandbox",
                [service, "sandbox", "--port", str(self.ports.sandbox), "--api-key", self.api_key],
                self.ports.sandbox,
                "/_sandbox/state",
            )
            await self._start(
                "retailcrm-service",
                [service, "serve", "--port", str(self.ports.service)],
                self.ports.service,
                "/health",
            )
            await self._start(
                "call-service",
                [
                    _script("vochi-call-service"),
                    "--port",
                    str(self.ports.call_service),
                    "--target",
                    f"retailcrm={self.service_url}/api/events",
                ],
                self.ports.call_service,
                "/health",
            )
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for child in reversed(self._children):
            child.stop()
        self._children.clear()
        await self._http.aclose()

    async def _start(self, name: str, argv: list[str], port: int, ready_path: str) -> None:
        child = _Child(
            name, argv, env=self.env, port=port, ready_path=ready_path, log_dir=self.log_dir
        )
        self._children.append(child)
        await child.start(self._http)
        print(f"Started {name} on {child.url}", flush=True)

    async def _call(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._http.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise DemoError(
                f"{method} {url} answered {response.status_code}: {response.text[:300]}"
            )
        body: dict[str, Any] = response.json()
        return body

    async def connect_enterprise(self, number: str) -> None:
        """Point the enterprise at the sandbox account and register the telephony module."""
        await self._call(
            "PUT",
            f"{self.service_url}/api/config/{number}",
            json={
                "domain": self.sandbox_url,
                "api_key": self.api_key,
                "enabled": True,
                "user_extensions": DEMO_EXTENSIONS,
            },
        )
        await self._call("POST", f"{self.service_url}/retailcrm-admin/api/register/{number}")
        print(
            f"Enterprise {number}: RetailCRM sandbox connected, telephony module registered",
            flush=True,
        )

    async def play_demo_call(self, enterprise: DemoEnterprise) -> str:
        """An incoming call through the call service, as the Asterisk host sends it."""
        unique_id = f"{int(time.time())}.{secrets.randbelow(10_000)}"
        phone = "+375291234567"
        now = datetime.now(ZoneInfo(DEFAULT_TIMEZONE)).replace(tzinfo=None, microsecond=0)
        fmt = "%Y-%m-%d %H:%M:%S"
        common = {
            "Token": enterprise.token,
            "UniqueId": unique_id,
            "Phone": phone,
            "CallType": 0,
            "Trunk": "0001363",
        }
        steps: list[tuple[str, dict[str, Any]]] = [
            ("start", {**common}),
            ("dial", {**common, "Extensions": ["150", "151"], "ExtTrunk": "", "ExtPhone": phone}),
            (
                "dial",
                {**common, "Extensions": ["150", "151", "152"], "ExtTrunk": "", "ExtPhone": phone},
            ),
            (
                "bridge",
                {
                    "Token": enterprise.token,
                    "UniqueId": unique_id,
                    "BridgeUniqueid": str(secrets.token_hex(8)),
                    "Channel": "SIP/152-0000a1b2",
                    "Exten": "152",
                    "CallerIDNum": phone.lstrip("+"),
                    "CallerIDName": "",
                    "ConnectedLineNum": "152",
                    "ConnectedLineName": "Manager 152",
                },
            ),
            (
                "hangup",
                {
                    **common,
                    "Extensions": ["150", "151", "152"],
                    "DateReceived": (now - timedelta(seconds=170)).strftime(fmt),
                    "StartTime": (now - timedelta(seconds=167)).strftime(fmt),
                    "EndTime": now.strftime(fmt),
                    "CallStatus": "2",
                },
            ),
        ]
        for path, body in steps:
            await self._call(
                "POST",
                f"{self.call_service_url}/{path}",
                json=body,
                headers={"Token": enterprise.token},
            )
            await asyncio.sleep(0.3)
        return await self._summarise_call(unique_id, phone)

    async def _summarise_call(self, unique_id: str, phone: str, wait_seconds: float = 30.0) -> str:
        deadline = time.monotonic() + wait_seconds
        account: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = await self._call("GET", f"{self.sandbox_url}/_sandbox/state")
            account = next(iter(state["accounts"].values()))
            if any(c.get("externalId") == unique_id for c in account.get("calls", [])):
                break
            await asyncio.sleep(0.5)
        else:
            return f"Demo call {unique_id}: not in the sandbox's call history yet (see the logs)"
        call = next(c for c in account["calls"] if c.get("externalId") == unique_id)
        popups = [p for p in account.get("popups", []) if p.get("callExternalId") == unique_id]
        users = sorted({p.get("userId") for p in popups if p.get("userId") is not None})
        return "\n".join(
            [
                f"Demo call {unique_id} (incoming from {phone}) went through the whole pipeline:",
                f"  RetailCRM popups shown to users: {', '.join(map(str, users)) or '-'}",
                f"  call history: result={call.get('result')} duration={call.get('duration')}s "
                f"code={call.get('code')} userId={call.get('userId')}",
            ]
        )

    def describe(self) -> str:
        link = subprocess.run(  # noqa: S603 - our own console script
            [_script("retailcrm-service"), "token", DEMO_ENTERPRISES[0].number],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return "\n".join(
            [
                "",
                f"RetailCRM sandbox  {self.sandbox_url}  state: {self.sandbox_url}/_sandbox/state"
                f"  (API key {mask(self.api_key)})",
                f"RetailCRM service  {self.service_url}  /health /stats /metrics",
                f"Call service       {self.call_service_url}  POST /start /dial /bridge /hangup;"
                " /health /stats",
                f"Admin link for {DEMO_ENTERPRISES[0].number} (1 hour): {link or '(unavailable)'}",
                f"Process logs       {self.log_dir}",
            ]
        )


async def read_matrix(dsn: str) -> dict[str, list[str]]:
    """enterprise number -> sorted enabled integrations, through the client library."""
    from vochi_crm_client import EnablementMatrix

    numbers = [e.number for e in DEMO_ENTERPRISES]
    async with EnablementMatrix(dsn=dsn) as matrix:
        return {n: sorted(await matrix.integrations_for(n)) for n in numbers}


def format_matrix(matrix: dict[str, list[str]]) -> str:
    names = {e.number: e.name for e in DEMO_ENTERPRISES}
    lines = ["Enablement matrix (enterprise -> CRMs switched on):"]
    for number, crms in sorted(matrix.items()):
        lines.append(f"  {number}  {names.get(number, ''):<28} {', '.join(crms) or '-'}")
    return "\n".join(lines)


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@dataclass(frozen=True, slots=True)
class DemoPorts:
    sandbox: int = 8090
    service: int = 8019
    call_service: int = 8000


async def _main(ports: DemoPorts, wait: bool) -> int:
    dsn = database_url(database_url_from(), data_dir_from(os.environ))
    print(f"PostgreSQL: {redact_dsn(dsn)}", flush=True)
    applied = await migrate(dsn)
    print(f"Migrations applied: {', '.join(applied) or 'none pending'}", flush=True)
    await seed_enterprises(dsn, DEMO_ENTERPRISES)
    await seed_extensions(dsn, DEMO_ENTERPRISES[0].number, DEMO_EXTENSIONS)
    print(format_matrix(await read_matrix(dsn)), flush=True)

    async with DemoSystem(dsn, ports) as system:
        await system.connect_enterprise(DEMO_ENTERPRISES[0].number)
        summary = await system.play_demo_call(DEMO_ENTERPRISES[0])
        print(summary, flush=True)
        print(system.describe(), flush=True)
        print("Demo ready. Press Ctrl-C to stop.", flush=True)
        if wait:
            await _wait_for_interrupt()
    return 0


def run(*, ports: DemoPorts | None = None, wait: bool = True) -> int:
    return asyncio.run(_main(ports or DemoPorts(), wait))
