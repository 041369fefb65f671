"""The system under test on this machine, and the faults the scenarios inject into it.

``Stack`` owns the RetailCRM stand-in (one account per enterprise, rate limits on) and the
enterprises in PostgreSQL for the whole run, and one *design* at a time:

- ``ours``: ``vochi-call-service`` processes -> ``retailcrm-service`` instances on the one
  PostgreSQL; call service i posts to instance i (mod their number), host j goes to call service
  j (mod theirs);
- ``naive``: the baseline of ``_peak_calls.naive``, with as many processes of each kind; it
  reads the config (domain, API key) that ours' start wrote, and uses the modules it
  registered, so ours starts first.

The enterprises are seeded with ``retailcrm_service.demo``'s helpers and connected the way an
admin does it: ``PUT /api/config/{n}`` (domain, API key, extensions), then
``POST /retailcrm-admin/api/register/{n}`` (the telephony module, in the stand-in).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from _peak_calls import instrument
from _peak_calls.calls import USER_EXTENSIONS
from _peak_calls.crm import RECEIPTS, accounts
from _peak_calls.procs import Monitor, Postgres, Proc, free_port
from retailcrm_service.ops.demo import DemoEnterprise, seed_enterprises, seed_extensions
from retailcrm_service.settings import database_url_from
from retailcrm_service.storage.database import scratch_database

DESIGNS = ("ours", "naive")


def database() -> contextlib.AbstractAsyncContextManager[str]:
    """A scratch database on ``DATABASE_URL``'s server, or on a temporary embedded one (stopped
    and deleted afterwards, also after the PostgreSQL-restart scenario)."""
    return scratch_database("bench_peak", server=database_url_from())


@dataclass(frozen=True, slots=True)
class Enterprise:
    number: str
    token: str
    api_key: str

    @property
    def account(self) -> str:
        return f"ent-{self.number}"


def make_enterprises(count: int) -> list[Enterprise]:
    return [
        Enterprise(
            number=f"{1001 + i}",
            token=f"37529{secrets.randbelow(10**7):07d}{i:02d}",
            api_key=secrets.token_hex(16),
        )
        for i in range(count)
    ]


class Stack:
    """See the module docstring; an async context manager."""

    def __init__(
        self,
        *,
        dsn: str,
        script: str,
        enterprises: int,
        services: int,
        call_services: int,
        postgres_owned: bool,
    ) -> None:
        self.dsn = dsn
        self.script = script
        self.enterprises = make_enterprises(enterprises)
        self.services = services
        self.call_services = call_services
        self.postgres_owned = postgres_owned
        self.work = Path(tempfile.mkdtemp(prefix="peak-calls-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.monitor = Monitor()
        self.postgres = Postgres()
        self.http = httpx.AsyncClient(timeout=10.0)
        self.crm: Proc | None = None
        self.design = ""
        self.procs: list[Proc] = []  # the current design's processes
        self.base_env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "PYTHONUNBUFFERED": "1",
            # The benchmark's own helpers, then the checkout it belongs to (not whatever
            # checkout the environment's editable install points at).
            "PYTHONPATH": os.pathsep.join(
                str(p) for p in (Path(script).resolve().parent, Path(script).resolve().parents[1])
            ),
        }
        self._plans = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Stack:
        try:
            await self._seed()
            await self._attach_postgres()
            self.monitor.add(self.postgres)
            keys = {e.account: e.api_key for e in self.enterprises}
            seed_path = self.work / "accounts.json"
            seed_path.write_text(json.dumps(accounts(keys, USER_EXTENSIONS)))
            port = free_port()
            self.crm = self._proc(
                "sandbox", "sandbox", ["--port", str(port), "--accounts", str(seed_path)], port
            )
            self.crm.ready_path = "/_sandbox/settings"
            self.crm.start()
            await self.crm.ready(self.http)
            self.monitor.add(self.crm)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self.stop_design()
        if self.crm is not None:
            self.crm.stop()
        self.monitor.close()
        await self.http.aclose()
        if exc_type is None:
            shutil.rmtree(self.work, ignore_errors=True)
        else:  # the processes' logs tell why
            print(f"peak_calls: logs kept in {self.logs}", file=sys.stderr)

    def _proc(self, name: str, role: str, args: list[str], port: int | None) -> Proc:
        argv = [sys.executable, self.script, "--role", role, *args]
        return Proc(name, role, argv, env=self.base_env, log_dir=self.logs, port=port)

    async def _seed(self) -> None:
        ents = [
            DemoEnterprise(
                number=e.number,
                name=f"Peak {e.number}",
                token=e.token,
                secret=secrets.token_hex(16),
                integrations={"retailcrm": {"enabled": True}},
            )
            for e in self.enterprises
        ]
        await seed_enterprises(self.dsn, ents)
        for e in self.enterprises:
            await seed_extensions(self.dsn, e.number, USER_EXTENSIONS)

    async def _attach_postgres(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            self.postgres.attach(await conn.fetchval("SELECT pg_backend_pid()"))
            self.data_directory = str(await conn.fetchval("SHOW data_directory"))
        finally:
            await conn.close()

    # -- designs ---------------------------------------------------------------------------------

    def counts_dir(self, role: str) -> Path:
        path = self.work / "queries" / role
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def start(self, design: str) -> None:
        """Start the design's service instances, connect the enterprises, then its call services."""
        assert design in DESIGNS
        assert not self.procs
        self.design = design
        svc_role, cs_role = (
            ("service", "call-service") if design == "ours" else ("naive-service", "naive-call")
        )
        env_extra = {
            "RETAILCRM_ALLOW_HTTP": "1",
            "RETAILCRM_DATA_DIR": str(self.work / "data"),
            "RETAILCRM_JWT_SECRET": secrets.token_urlsafe(48),
        }
        services = []
        for i in range(self.services):
            port = free_port()
            proc = self._proc(
                f"{design}-service-{i + 1}",
                svc_role,
                ["--port", str(port), "--counts", str(self.counts_dir(svc_role))],
                port,
            )
            proc.env.update(env_extra, RETAILCRM_PUBLIC_URL=proc.url)
            proc.ready_path = "/health"
            services.append(proc)
        await self._launch(services)
        if design == "ours":
            await self._connect(services[0].url)
        calls = []
        for i in range(self.call_services):
            port = free_port()
            target = f"{services[i % len(services)].url}/api/events"
            proc = self._proc(
                f"{design}-call-service-{i + 1}",
                cs_role,
                [
                    "--port",
                    str(port),
                    "--target",
                    f"retailcrm={target}",
                    "--counts",
                    str(self.counts_dir(cs_role)),
                ],
                port,
            )
            proc.ready_path = "/health"
            calls.append(proc)
        await self._launch(calls)

    async def _launch(self, procs: Sequence[Proc]) -> None:
        for proc in procs:
            proc.start()
            self.procs.append(proc)
        for proc in procs:
            await proc.ready(self.http)
            self.monitor.add(proc)

    async def stop_design(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ValueError):
                self.monitor.remove(proc)
            proc.stop()
        self.procs.clear()
        self.design = ""

    async def _connect(self, service_url: str) -> None:
        crm = self.crm
        assert crm is not None
        for e in self.enterprises:
            for method, path, body in (
                (
                    "PUT",
                    f"/api/config/{e.number}",
                    {
                        "domain": crm.url,
                        "api_key": e.api_key,
                        "enabled": True,
                        "user_extensions": USER_EXTENSIONS,
                    },
                ),
                ("POST", f"/retailcrm-admin/api/register/{e.number}", None),
            ):
                reply = await self.http.request(method, service_url + path, json=body)
                if reply.status_code >= 400:
                    raise RuntimeError(f"{method} {path}: {reply.status_code} {reply.text[:300]}")

    @property
    def services_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.role in ("service", "naive-service")]

    @property
    def call_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.role in ("call-service", "naive-call")]

    # -- load ------------------------------------------------------------------------------------

    async def play(
        self,
        segments: list[dict[str, Any]],
        *,
        t0: float,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Run the simulated hosts over ``segments`` (offsets from ``t0``); their records."""
        self._plans += 1
        plan_path = self.work / f"plan-{self._plans}.json"
        out = self.work / f"hosts-{self._plans}.json"
        targets = [["127.0.0.1", p.port] for p in self.call_procs]
        plan = {
            "t0": t0,
            "seed": self._plans,
            "targets": targets,
            "enterprises": [[e.token, i % len(targets)] for i, e in enumerate(self.enterprises)],
            "segments": segments,
            "out": str(out),
        }
        plan_path.write_text(json.dumps(plan))
        longest = max(s["start"] + s["duration"] for s in segments) + (t0 - time.time())
        with (self.logs / "hosts.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                self.script,
                "--role",
                "hosts",
                "--plan",
                str(plan_path),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=self.base_env,
            )
        try:
            async with asyncio.timeout(longest + 60):
                assert proc.stdout is not None
                total = 0
                async for raw in proc.stdout:
                    words = raw.decode().split()
                    if words[:1] == ["plan"]:
                        total = int(words[1])
                    elif words[:1] == ["progress"] and on_progress is not None:
                        on_progress(int(words[2]), total)
                if await proc.wait() != 0:
                    raise RuntimeError(f"the host simulator failed; see {self.logs / 'hosts.log'}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        result: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        return result

    # -- observations ----------------------------------------------------------------------------

    async def receipts(self) -> dict[str, Any]:
        assert self.crm is not None
        reply = await self.http.get(self.crm.url + RECEIPTS, timeout=30.0)
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        return body

    async def idle(self) -> bool:
        """Nothing of the current design is still on its way to RetailCRM."""
        try:
            stats = [
                (await self.http.get(p.url + "/stats", timeout=5.0)).json() for p in self.call_procs
            ]
        except (httpx.HTTPError, ValueError):
            return False
        if self.design == "naive":
            services = [
                (await self.http.get(p.url + "/stats", timeout=5.0)).json()
                for p in self.services_procs
            ]
            return all(s["in_flight"] == 0 for s in stats + services)
        for s in stats:
            if s.get("pending", 0):  # waiting for the matrix to load their enterprise
                return False
            for target in s.get("targets", {}).values():
                if target.get("queued", 0) or target.get("in_flight", 0):
                    return False
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        try:
            pending = await conn.fetchval(
                "SELECT count(*) FROM retailcrm_outbox WHERE state = 'pending'"
            )
        finally:
            await conn.close()
        return int(pending) == 0

    async def client_drops(self) -> Counter[str]:
        """Events the call services' client dropped so far, by reason (ours only)."""
        drops: Counter[str] = Counter()
        if self.design != "ours":
            return drops
        for proc in self.call_procs:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                stats = (await self.http.get(proc.url + "/stats", timeout=5.0)).json()
                for target in stats.get("targets", {}).values():
                    drops.update(target.get("dropped", {}))
        return drops

    async def outbox_outcomes(self) -> dict[str, Counter[str]]:
        """Per segment (the UniqueId's prefix): popup rows that were not delivered, by outcome."""
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                """SELECT split_part(call_unique_id, '.', 1) AS phase, state,
                          count(*) AS n
                     FROM retailcrm_outbox
                    WHERE kind = 'popup' AND state NOT IN ('delivered', 'skipped')
                    GROUP BY 1, 2"""
            )
        finally:
            await conn.close()
        out: dict[str, Counter[str]] = {}
        for row in rows:
            out.setdefault(row["phase"], Counter())[f"service_{row['state']}"] += int(row["n"])
        return out

    async def pending_history(self, uids: Sequence[str]) -> set[str]:
        """Which of these calls still have their history pending in the outbox (late, not lost)."""
        if not uids:
            return set()
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                """SELECT DISTINCT call_unique_id FROM retailcrm_outbox
                    WHERE kind = 'history' AND state = 'pending'
                      AND call_unique_id = ANY($1::text[])""",
                list(uids),
            )
        finally:
            await conn.close()
        return {r["call_unique_id"] for r in rows}

    async def transactions(self) -> int:
        """Committed and rolled-back transactions of the benchmark's database so far."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return int(
                await conn.fetchval(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                    " WHERE datname = current_database()"
                )
            )
        finally:
            await conn.close()

    def queries(self) -> dict[str, int]:
        root = self.work / "queries"
        if not root.exists():
            return {}
        return {d.name: instrument.total(d) for d in root.iterdir() if d.is_dir()}

    # -- faults ----------------------------------------------------------------------------------

    async def sandbox_down(self, down: bool) -> None:
        assert self.crm is not None
        if down:
            reply = await self.http.post(
                self.crm.url + "/_sandbox/faults", json={"endpoint": "*", "mode": "down"}
            )
        else:
            reply = await self.http.delete(self.crm.url + "/_sandbox/faults")
        reply.raise_for_status()

    async def kill_service(self, index: int) -> Proc:
        proc = self.services_procs[index]
        self.monitor.remove(proc)
        proc.kill()
        return proc

    async def restart(self, proc: Proc) -> None:
        proc.start()
        await proc.ready(self.http)
        self.monitor.add(proc)

    async def restart_postgres(self) -> None:
        """``pg_ctl restart -m fast`` of the benchmark's own embedded server."""
        if not self.postgres_owned:
            raise RuntimeError("PostgreSQL is not the benchmark's own (DATABASE_URL is set)")
        from pgserver import pg_ctl

        data = Path(self.data_directory)
        owner = pwd.getpwuid(os.stat(data).st_uid).pw_name
        user = None if owner == pwd.getpwuid(os.getuid()).pw_name else owner
        args = ["-w", "-m", "fast", "-t", "60", "-l", str(data / "log"), "restart"]
        await asyncio.to_thread(pg_ctl, args, pgdata=data, user=user, timeout=90)
        await self._attach_postgres()
