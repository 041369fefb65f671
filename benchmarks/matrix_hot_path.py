"""How much does a matrix hit cost compared with a bare ``dict.get``?

Measures, in the same process and run, the synchronous hit path of the enablement matrix
(``EnablementMatrix.lookup(number)``, which is ``RefreshingCache.peek``) on a snapshot of 5,000
enterprises, against the baseline ``dict.get(number)`` on a plain dict with the same contents.
Each figure is the median over many repeats of a timed loop (timeit, per-call nanoseconds).
The matrix is built and filled by its real full loader, over a real PostgreSQL (the embedded
server when DATABASE_URL is unset), with the listener off: the hot path never touches the
database, so only the lookup itself is timed. Target: ratio within 3x.

Usage: python benchmarks/matrix_hot_path.py [--quick]
The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import timeit
from typing import Any

import asyncpg

from retailcrm_service.settings import database_url_from
from retailcrm_service.storage.database import scratch_database
from vochi_crm_client import EnablementMatrix

ENTERPRISES = 5000
KEY = "0367"


async def _seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            """INSERT INTO enterprises (number, name2, secret, integrations_config)
               VALUES ($1, $2, $3, $4::jsonb)""",
            [
                (
                    f"{i:04d}",
                    f"token-{i:04d}",
                    secrets.token_hex(16),
                    json.dumps({"retailcrm": {"enabled": i % 2 == 1}, "uon": {"enabled": True}}),
                )
                for i in range(ENTERPRISES)
            ],
        )
    finally:
        await conn.close()


def _timer(statement: str, **names: Any) -> timeit.Timer:
    # A statement, not a lambda: a lambda would add a Python call to both sides of the ratio.
    return timeit.Timer(statement, globals={"key": KEY, **names})


def _measure(matrix: EnablementMatrix, quick: bool) -> dict[str, float]:
    baseline = {f"{i:04d}": frozenset({"uon"}) for i in range(ENTERPRISES)}
    assert matrix.lookup(KEY) == frozenset({"retailcrm", "uon"}), "snapshot not loaded"
    # As callers write them: one attribute access and one call on each side.
    timers = {
        "hit": _timer("matrix.lookup(key)", matrix=matrix),
        "dict_get": _timer("table.get(key)", table=baseline),
        "hit_prebound": _timer("lookup(key)", lookup=matrix.lookup),
        "dict_get_prebound": _timer("get(key)", get=baseline.get),
    }
    loops, repeats = (50_000, 41) if quick else (200_000, 151)
    runs: dict[str, list[float]] = {name: [] for name in timers}
    # Interleaved, so that frequency scaling or a noisy neighbour hits every variant alike.
    for _ in range(repeats):
        for name, timer in timers.items():
            runs[name].append(timer.timeit(loops) / loops * 1e9)
    ns = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "hit_ns": round(ns["hit"], 1),
        "dict_get_ns": round(ns["dict_get"], 1),
        "ratio": round(ns["hit"] / ns["dict_get"], 2),
        "hit_prebound_ns": round(ns["hit_prebound"], 1),
        "dict_get_prebound_ns": round(ns["dict_get_prebound"], 1),
        "ratio_prebound": round(ns["hit_prebound"] / ns["dict_get_prebound"], 2),
    }


async def _run(dsn: str, quick: bool) -> dict[str, Any]:
    await _seed(dsn)
    async with EnablementMatrix(dsn=dsn, listen=False) as matrix:
        figures = _measure(matrix, quick)
        hits = matrix.stats()["matrix"]["hits"]
    return {"bench": "matrix_hot_path", **figures, "enterprises": ENTERPRISES, "hits": hits}


async def _with_database(quick: bool) -> dict[str, Any]:
    async with scratch_database("bench_matrix", server=database_url_from()) as dsn:
        return await _run(dsn, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (well under a minute)")
    args = parser.parse_args()
    result = asyncio.run(_with_database(args.quick))
    rows = [
        ("matrix.lookup(number)   [hit]", result["hit_ns"]),
        ("table.get(number)       [baseline]", result["dict_get_ns"]),
        ("lookup(number)          [hit, pre-bound]", result["hit_prebound_ns"]),
        ("get(number)             [baseline, pre-bound]", result["dict_get_prebound_ns"]),
    ]
    print(f"{'path':<48}{'median ns/call':>16}")
    for label, value in rows:
        print(f"{label:<48}{value:>16.1f}")
    print(f"{'ratio (target <= 3.0)':<48}{result['ratio']:>16.2f}")
    print(f"{'ratio, pre-bound':<48}{result['ratio_prebound']:>16.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
