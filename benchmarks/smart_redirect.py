"""Smart-redirect latency: a cached answer vs an uncached one vs a trivial endpoint, in one run.

What it measures: the wall time of sequential requests (the modes interleaved) over one keep-alive
HTTP connection on loopback to the real service (uvicorn in this process, real PostgreSQL, the
RetailCRM sandbox):

- ``baseline``: ``GET /health`` (a trivial route: one ``SELECT 1``), the floor of this stack;
- ``cached``:   ``POST /api/callevent/getcustomerdata`` for a caller asked about before;
- ``uncached``: the same route for a new caller each time (a ``telephony/manager`` lookup in
  the sandbox, then the extension and dialplan context).

The uncached figure includes the sandbox's own handling time (it dominates on this stack).
The figures are p50/p99 per mode. ``cached_to_baseline`` (p99 ratio) says what the cache costs
over the floor; ``uncached_to_cached`` what it saves. The last output line is one JSON object.

    python benchmarks/smart_redirect.py [--quick] [--requests N]

PostgreSQL: ``DATABASE_URL`` (a superuser DSN; a scratch database is created and dropped) or an
embedded server under a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import uvicorn

from retailcrm_service.app import create_app
from retailcrm_service.sandbox import AsyncSandboxServer
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings, database_url_from
from retailcrm_service.storage.database import scratch_database

ENTERPRISE = "0367"
TOKEN = f"bench-{secrets.token_hex(8)}"  # the enterprise's Asterisk token (name2)
TRUNK = "0001363"


def _phone(i: int) -> str:
    return f"+37529{i:07d}"


async def seed(dsn: str, crm: AsyncSandboxServer, key: str) -> None:
    config = {
        "retailcrm": {
            "enabled": True,
            "domain": crm.url,
            "api_key": key,
            "user_extensions": {"7": "150"},
            "clientId": secrets.token_urlsafe(32),
        }
    }
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO enterprises (number, name, name2, secret, ip, integrations_config)
               VALUES ($1, 'Bench', $2, $3, '127.0.0.1', $4::jsonb)""",
            ENTERPRISE,
            TOKEN,
            secrets.token_hex(16),
            json.dumps(config),
        )
        await conn.execute(
            "INSERT INTO user_internal_phones (phone_number, enterprise_number) VALUES ('150', $1)",
            ENTERPRISE,
        )
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[str]:
    app = create_app(settings, parts={"smart_redirect"})
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the service stopped during startup")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


async def measure(n: int, call: Callable[[int], Awaitable[httpx.Response]]) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        reply = await call(i)
        samples.append((time.perf_counter() - started) * 1000)
        if reply.status_code != 200:
            raise RuntimeError(f"unexpected {reply.status_code}: {reply.text[:200]}")
    return samples


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(n: int) -> dict[str, float | int | str]:
    key = secrets.token_hex(16)
    customers = [{"id": i + 1, "managerId": 7, "phones": [_phone(i)]} for i in range(n + 1)]
    account = {
        "name": "bench",
        "api_key": key,
        "demo": False,
        "users": [{"id": 7, "firstName": "Ann", "lastName": "Lee"}],
        "customers": customers,
    }
    async with (
        scratch_database(server=database_url_from()) as dsn,
        AsyncSandboxServer(accounts=[account], rate_limit=False) as crm,
    ):
        await seed(dsn, crm, key)
        settings = Settings(
            database_url=Secret(dsn),
            jwt_secret=Secret(secrets.token_urlsafe(32)),
            allow_http=True,
            data_dir=Path(tempfile.gettempdir()),
            dialplan_rps=1e9,  # measure lookups, not the per-enterprise rate limit
        )
        async with running(settings) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:

            def lookup(phone: str) -> Awaitable[httpx.Response]:
                return http.post(
                    "/api/callevent/getcustomerdata",
                    headers={"Token": TOKEN},
                    json={"UniqueId": "1764150000.1", "Phone": phone, "TrunkId": TRUNK},
                )

            warm = await lookup(_phone(n))
            if json.loads(warm.text)["DialPlan"] is None:
                raise RuntimeError(f"the warm-up lookup did not route: {warm.text}")
            await measure(min(50, n), lambda i: http.get("/health"))  # warm the connection
            modes: dict[str, Callable[[int], Awaitable[httpx.Response]]] = {
                "baseline": lambda i: http.get("/health"),
                "cached": lambda i: lookup(_phone(n)),
                "uncached": lambda i: lookup(_phone(i)),
            }
            samples: dict[str, list[float]] = {mode: [] for mode in modes}
            # Interleaved, so that load from elsewhere on the machine hits every mode alike.
            for i in range(n):
                for mode, call in modes.items():
                    samples[mode] += await measure(1, lambda _j, call=call, i=i: call(i))
            baseline, cached, uncached = (samples[m] for m in ("baseline", "cached", "uncached"))
    figures: dict[str, float | int | str] = {"bench": "smart_redirect", "requests": n}
    for name, samples in (("baseline", baseline), ("cached", cached), ("uncached", uncached)):
        figures[f"{name}_p50_ms"] = round(statistics.median(samples), 3)
        figures[f"{name}_p99_ms"] = round(p(samples, 0.99), 3)
    figures["cached_to_baseline"] = round(
        float(figures["cached_p99_ms"]) / float(figures["baseline_p99_ms"]), 3
    )
    figures["uncached_to_cached"] = round(
        float(figures["uncached_p99_ms"]) / float(figures["cached_p99_ms"]), 3
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 requests per mode")
    parser.add_argument("--requests", type=int, default=None)
    args = parser.parse_args()
    n = args.requests or (300 if args.quick else 2000)
    logging.basicConfig(level=logging.ERROR)
    figures = asyncio.run(run(n))
    print(f"smart redirect latency, {n} sequential requests per mode (ms)")
    print(f"{'mode':<10} {'p50':>8} {'p99':>8}")
    for mode in ("baseline", "cached", "uncached"):
        print(f"{mode:<10} {figures[f'{mode}_p50_ms']:>8} {figures[f'{mode}_p99_ms']:>8}")
    print(f"cached p99 / baseline p99 = {figures['cached_to_baseline']}")
    print(f"uncached p99 / cached p99 = {figures['uncached_to_cached']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
