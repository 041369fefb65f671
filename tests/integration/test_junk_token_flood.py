"""A flood of distinct junk Tokens and repeated "*" changes against the reference call service
(the real matrix on PostgreSQL): valid webhooks keep being acknowledged at their normal latency
and the event loop never stalls.

Each junk Token is cached negatively; a "*" change (an enterprise added, removed or its tokens
changed) forgets every negative token. Latency and stalls are compared with a baseline measured
in the same test, with generous ratios: what is caught is work that grows with the number of
cached tokens (seconds of stall past the host's 3 s timeout), not the machine's speed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from adapters.call_service import CallServiceSettings, create_app
from tests.integration._servers import RecordingReceiver
from tests.support.pg import create_enterprise
from tests.support.pipeline import fixture_records
from tests.support.procs import ThreadedServer
from tests.support.service import serving
from vochi_crm_client import CacheSettings, CrmClient

TOKEN = "375291110001"
JUNK = 6000
WORKERS = 16


@pytest.fixture
def receiver() -> Iterator[ThreadedServer]:
    with ThreadedServer(RecordingReceiver(), lifespan="off") as server:
        yield server


class StallMonitor:
    """The longest gap between two ticks of a task that asks to run every 10 ms."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.01)
            last = now

    def start(self) -> None:
        self.longest = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.longest


async def _probe(http: httpx.AsyncClient, body: dict[str, Any], count: int) -> list[float]:
    """Valid webhooks one after another; their acknowledgement latencies."""
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        reply = await http.post(
            "/hangup", json={**body, "UniqueId": f"{time.time():.0f}.{i}"}, headers={"Token": TOKEN}
        )
        latencies.append(time.perf_counter() - started)
        assert reply.status_code == 200, reply.text
    return latencies


async def _flood(crm: CrmClient, prefix: str, n: int) -> None:
    """Distinct junk Tokens resolved as a webhook with an unknown Token does (a miss loads it,
    and it is cached negatively), by many requests at once."""
    tokens = iter(f"{prefix}-{i:06d}-junk" for i in range(n))

    async def worker() -> None:
        for token in tokens:
            assert await crm.resolve_token(token) is None

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def _junk_webhooks(http: httpx.AsyncClient, body: dict[str, Any], n: int) -> None:
    for i in range(n):
        reply = await http.post("/hangup", json=body, headers={"Token": f"web-{i}-junk"})
        assert reply.status_code == 403


async def _star_changes(database_url: str, count: int, every: float) -> None:
    """Token changes of another enterprise: each one NOTIFYs integrations_changed "*"."""
    conn = await asyncpg.connect(database_url)
    try:
        for i in range(count):
            await asyncio.sleep(every)
            await conn.execute("UPDATE enterprises SET secret = $1 WHERE number = '0400'", f"s{i}")
    finally:
        await conn.close()


@pytest.mark.slow
async def test_junk_tokens_and_star_changes_leave_valid_webhooks_at_their_normal_latency(
    database_url: str, db: asyncpg.Connection, receiver: ThreadedServer
) -> None:
    await create_enterprise(db, "0367", name2=TOKEN, integrations={"retailcrm": True})
    await create_enterprise(db, "0400", name2="375291110002", integrations={"retailcrm": True})
    body = dict(fixture_records()[4]["body"])
    body.pop("Token", None)
    # Production cache settings, except that junk stays cached negatively for the whole test
    # (a faster flood than this machine can make fills the cache within the production TTL).
    cache = CacheSettings(negative_ttl=600.0)
    app = create_app(
        CallServiceSettings(
            dsn=database_url,
            targets={"retailcrm": f"{receiver.url}/api/events"},
            client_options={"cache": cache},
        )
    )
    found: list[CrmClient] = []

    async def call_service(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not found:  # the lifespan's client, to flood its matrix
            found.append(scope["state"]["crm"])
        await app(scope, receive, send)

    monitor = StallMonitor()
    async with (
        serving(call_service) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        await _probe(http, body, 20)  # warm up: the Token is cached, connections are open
        crm = found[0]
        monitor.start()
        baseline_probe = asyncio.create_task(_probe(http, body, 100))
        await asyncio.gather(_flood(crm, "quiet", 200), _junk_webhooks(http, body, 50))
        baseline = await baseline_probe
        baseline_stall = await monitor.stop()

        monitor.start()
        await _flood(crm, "first", JUNK)  # thousands of junk tokens cached negatively
        cached = crm.stats()["matrix"]["tokens"]["negative_size"]
        probe = asyncio.create_task(_probe(http, body, 200))
        await asyncio.gather(
            _flood(crm, "second", JUNK // 3),
            _junk_webhooks(http, body, 200),
            _star_changes(database_url, 5, 0.3),
        )
        flooded = await probe
        stall = await monitor.stop()
        tokens = crm.stats()["matrix"]["tokens"]
    assert cached >= JUNK // 2
    assert tokens["invalidations"] >= cached  # the "*" changes forgot the cached junk
    # Generous: the flood shares the loop with the probe; only work growing with the cached
    # junk (a whole-map copy per insert, a walk per "*") makes these ratios.
    assert stall < max(1.0, 20 * baseline_stall), (stall, baseline_stall)
    assert statistics.median(flooded) < 10 * statistics.median(baseline) + 0.05
    assert max(flooded) < max(1.5, 20 * max(baseline)), (max(flooded), max(baseline))
