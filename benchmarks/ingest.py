"""Ingest throughput of POST /api/events: durable (group-committed outbox) vs no database.

Question: how many events/s does the service accept, and at what acknowledgement latency, when
every 202 waits for a PostgreSQL commit? Baseline, measured in the same run: the same route, the
same parsing and validation, with a committer that stores nothing. Both servers run as separate
processes (uvicorn, one worker) serving only the events router; the load generator posts batches
of 100 events over keep-alive connections with a fixed concurrency.

    python benchmarks/ingest.py [--quick]

Prints a table, then one JSON line: {"bench": "ingest", "durable_eps", "nodb_eps", "ratio",
"durable_p99_ms", "nodb_p99_ms", ...}. Uses DATABASE_URL or an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from retailcrm_service.settings import database_url_from
from retailcrm_service.storage.database import scratch_database

BATCH = 100


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- server side (a subprocess of this script) --------------------------------------------------


def serve(mode: str, port: int, dsn: str) -> None:
    import asyncpg
    import uvicorn
    from fastapi import FastAPI

    from retailcrm_service.api import events
    from retailcrm_service.api.http import install_error_handlers
    from retailcrm_service.pipeline.intake import EventPipeline, NullCommitter
    from retailcrm_service.security.secrets import Secret
    from retailcrm_service.settings import Settings

    async def lifespan(app: FastAPI) -> Any:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        async with EventPipeline(pool=pool, configs=_NoConfigs(), deliver=False) as pipeline:
            if mode == "nodb":
                pipeline.committer = NullCommitter()
            app.state.event_pipeline = pipeline
            yield
        await pool.close()

    app = FastAPI(lifespan=lifespan)
    app.state.settings = Settings(database_url=Secret(dsn), jwt_secret=Secret("b" * 32))
    install_error_handlers(app)
    app.include_router(events.router)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class _NoConfigs:
    async def get(self, number: str) -> None:
        return None


# -- load generator -----------------------------------------------------------------------------


def _template() -> bytes:
    """One request body with ``@SEQ@`` where the request's sequence number goes (unique ids)."""
    events = []
    for i in range(BATCH):
        uid = f"@SEQ@.{i}"
        events.append(
            {
                "enterprise_number": "0367",
                "event_type": "hangup",
                "call_unique_id": uid,
                "payload": {
                    "UniqueId": uid,
                    "Phone": "+375291234567",
                    "Extensions": ["150"],
                    "CallType": 0,
                    "DateReceived": "2025-11-26 10:00:00",
                    "StartTime": "2025-11-26 10:00:03",
                    "EndTime": "2025-11-26 10:02:44",
                    "CallStatus": "2",
                    "Trunk": "0001363",
                },
            }
        )
    return json.dumps({"events": events}).encode()


TEMPLATE = _template()


def _body(seq: int) -> bytes:
    # A byte replace keeps the load generator cheap: it shares the machine with the server.
    return TEMPLATE.replace(b"@SEQ@", str(1764150000 + seq).encode())


async def load(url: str, seconds: float, concurrency: int, offset: int) -> dict[str, float]:
    latencies: list[float] = []
    accepted = 0
    errors = 0
    seq = offset
    deadline = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal accepted, seq, errors
        while time.perf_counter() < deadline:
            seq += 1
            body = _body(seq)
            start = time.perf_counter()
            try:
                response = await client.post(url, content=body, headers=headers)
            except httpx.TransportError:
                # A keep-alive connection closed under us: count it, resend on a fresh one.
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            if response.status_code != 202:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            accepted += response.json()["accepted"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        began = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "eps": accepted / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "requests": len(latencies),
        "accepted": accepted,
        "transport_errors": errors,
    }


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError("benchmark server exited")
        try:
            httpx.post(url, content=b"{}", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("benchmark server did not start")


async def _measure(seconds: float, concurrency: int) -> tuple[dict[str, float], dict[str, float]]:
    async with scratch_database("bench_ingest", server=database_url_from()) as dsn:
        await _prepare(dsn)
        nodb = await asyncio.to_thread(run_mode, "nodb", dsn, seconds, concurrency, 0)
        durable = await asyncio.to_thread(
            run_mode, "durable", dsn, seconds, concurrency, 50_000_000
        )
    return nodb, durable


def run_mode(
    mode: str, dsn: str, seconds: float, concurrency: int, offset: int
) -> dict[str, float]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port", str(port), "--dsn", dsn]
    )
    url = f"http://127.0.0.1:{port}/api/events"
    try:
        _wait(url, proc)
        asyncio.run(load(url, min(1.0, seconds / 4), concurrency, offset + 10_000_000))  # warm-up
        return asyncio.run(load(url, seconds, concurrency, offset))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _prepare(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO enterprises (number, name, name2, integrations_config)
               VALUES ('0367', 'bench', 'bench-token', '{"retailcrm": {"enabled": true}}')
               ON CONFLICT (number) DO NOTHING"""
        )
        await conn.execute("TRUNCATE retailcrm_outbox")
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve", choices=["durable", "nodb"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.dsn)
        return 0

    seconds = 6.0 if args.quick else 20.0
    nodb, durable = asyncio.run(_measure(seconds, args.concurrency))
    ratio = durable["eps"] / nodb["eps"] if nodb["eps"] else 0.0
    print(f"{'mode':<10}{'events/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'requests':>10}")
    for name, result in (("durable", durable), ("nodb", nodb)):
        print(
            f"{name:<10}{result['eps']:>12,.0f}{result['p50_ms']:>10.1f}"
            f"{result['p99_ms']:>10.1f}{result['requests']:>10.0f}"
        )
    print(f"durable / nodb = {ratio:.2f} (target >= 0.5, and >= 10,000 events/s durable)")
    print(
        json.dumps(
            {
                "bench": "ingest",
                "durable_eps": round(durable["eps"]),
                "nodb_eps": round(nodb["eps"]),
                "ratio": round(ratio, 3),
                "durable_p99_ms": round(durable["p99_ms"], 2),
                "nodb_p99_ms": round(nodb["p99_ms"], 2),
                "durable_p50_ms": round(durable["p50_ms"], 2),
                "nodb_p50_ms": round(nodb["p50_ms"], 2),
                "transport_errors": durable["transport_errors"] + nodb["transport_errors"],
                "batch": BATCH,
                "concurrency": args.concurrency,
                "seconds": seconds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
