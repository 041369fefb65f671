"""Dispatch throughput: how many call events/s one process delivers, and what ``emit()`` costs.

Measured in one run, each against its baseline:

1. events/s from one ``CrmClient`` to a trivial receiver (a separate process answering 202 per the
   contract), batched (``batch_max=100``, the default) vs one event per POST (``batch_max=1``), with
   the same client, the same connections (``max_in_flight=4``) and the same pre-built events.
   Target: batched >= 20x naive and >= 20,000 events/s.
2. the cost of ``emit()`` (matrix lookup + per-target buffer put) vs the floor it is compared with,
   a ``dict.get`` plus a ``deque.append`` on the same number of events.

The matrix is an in-memory stand-in: this measures dispatch, not PostgreSQL (the matrix's own
benchmark covers lookups). The last line of output is one JSON object with the figures.

    python benchmarks/dispatch_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import socket
import subprocess
import sys
import time
from collections import deque
from typing import Any

import anyio
import anyio.lowlevel

from vochi_crm_client import CallEvent, CrmClient, DispatchConfig, NotLoaded

ENTERPRISES = [f"{n:04d}" for n in range(1, 51)]


# -- the trivial receiver (runs in a child process) ------------------------------------------


class _Receiver(asyncio.Protocol):
    """HTTP/1.1 keep-alive, POST only: count the events of each body, answer 202."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            n = body.count(b'"idempotency_key":')
            reply = b'{"accepted":%d,"duplicates":0,"rejected":[]}' % n
            self.transport.write(
                b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(reply), reply)
            )


async def _serve_receiver() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Receiver, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await server.serve_forever()


# -- the sender ----------------------------------------------------------------------------


class StaticMatrix:
    """Every enterprise has the ``bench`` target on; nothing to load."""

    def __init__(self) -> None:
        self._on = {n: frozenset({"bench"}) for n in ENTERPRISES}

    def lookup(self, number: str) -> frozenset[str] | NotLoaded | None:
        return self._on.get(number)

    def lookup_token(self, token: str) -> str | NotLoaded | None:
        return None

    async def integrations_for(self, number: str) -> frozenset[str]:
        return self._on.get(number, frozenset())

    async def resolve_token(self, token: str) -> str | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {}


def make_events(n: int) -> list[CallEvent]:
    """Realistic hangups of 50 enterprises (about 330 bytes on the wire each)."""
    events = []
    for i in range(n):
        payload = {
            "UniqueId": f"1764150000.{i}",
            "Phone": "+375291234567",
            "Extensions": ["150", "151"],
            "CallType": 0,
            "DateReceived": "2025-11-26 10:00:00",
            "StartTime": "2025-11-26 10:00:03",
            "EndTime": "2025-11-26 10:02:44",
            "CallStatus": "2",
            "Trunk": "0001363",
        }
        events.append(
            CallEvent(
                enterprise_number=ENTERPRISES[i % len(ENTERPRISES)],
                event_type="hangup",
                payload=payload,
            )
        )
    return events


async def _delivered(crm: CrmClient, count: int) -> None:
    """Poll (cheaply, 2 kHz) until the target has acknowledged ``count`` events."""
    with anyio.fail_after(300):
        while True:
            if crm.stats()["targets"]["bench"]["delivered"] >= count:
                return
            await anyio.sleep(0.0005)


async def deliver(url: str, events: list[CallEvent], *, batch_max: int) -> dict[str, Any]:
    """Emit every event (yielding between chunks, as a server would) and wait until delivered."""
    async with CrmClient(
        targets={"bench": url},
        matrix=StaticMatrix(),
        dispatch=DispatchConfig(batch_max=batch_max, max_queue=len(events) + 1, drain_timeout=60),
    ) as crm:
        # Warm the keep-alive connections up before the clock starts.
        crm.emit(events[0])
        await _delivered(crm, 1)
        started = time.perf_counter()
        for chunk in range(1, len(events), 500):
            for event in events[chunk : chunk + 500]:
                crm.emit(event)
            await anyio.lowlevel.checkpoint()
        target = len(events)
        await _delivered(crm, target)
        elapsed = time.perf_counter() - started
        stats = crm.stats()["targets"]["bench"]
    return {
        "events": target - 1,
        "seconds": elapsed,
        "eps": (target - 1) / elapsed,
        "posts": stats["batches"],
        "retried": stats["retried"],
    }


async def emit_cost(events: list[CallEvent], rounds: int) -> tuple[float, float]:
    """ns per emit() and per dict.get + deque.append, best of ``rounds``."""
    table = {n: frozenset({"bench"}) for n in ENTERPRISES}
    emit_ns, base_ns = [], []
    for _ in range(rounds):
        async with CrmClient(
            targets={"bench": "http://127.0.0.1:9/unused"},
            matrix=StaticMatrix(),
            dispatch=DispatchConfig(max_queue=len(events) + 1, drain_timeout=0),
        ) as crm:
            emit = crm.emit
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter_ns()
                for event in events:  # no await: the workers cannot run meanwhile
                    emit(event)
                emit_ns.append((time.perf_counter_ns() - t0) / len(events))
            finally:
                gc.enable()
        sink: deque[CallEvent] = deque()
        get, append = table.get, sink.append
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            for event in events:
                get(event.enterprise_number)
                append(event)
            base_ns.append((time.perf_counter_ns() - t0) / len(events))
        finally:
            gc.enable()
    return min(emit_ns), min(base_ns)


def start_receiver() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--receiver"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/api/events"


async def run(quick: bool) -> dict[str, Any]:
    n_batched, n_naive, n_emit = (100_000, 3_000, 100_000) if quick else (400_000, 10_000, 300_000)
    proc, url = start_receiver()
    try:
        batched = await deliver(url, make_events(n_batched + 1), batch_max=100)
        naive = await deliver(url, make_events(n_naive + 1), batch_max=1)
    finally:
        proc.terminate()
        proc.wait(10)
    emit_ns, base_ns = await emit_cost(make_events(n_emit), rounds=3 if quick else 5)
    return {
        "bench": "dispatch_throughput",
        "quick": quick,
        "batched_eps": round(batched["eps"]),
        "naive_eps": round(naive["eps"]),
        "ratio": round(batched["eps"] / naive["eps"], 1),
        "batched_posts": batched["posts"],
        "naive_posts": naive["posts"],
        "emit_ns": round(emit_ns, 1),
        "baseline_ns": round(base_ns, 1),
        "emit_ratio": round(emit_ns / base_ns, 1),
        "batched_events": batched["events"],
        "naive_events": naive["events"],
    }


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("batched (100/POST)", f"{r['batched_eps']:>10,} events/s", f"{r['batched_posts']} POSTs"),
        ("one event per POST", f"{r['naive_eps']:>10,} events/s", f"{r['naive_posts']} POSTs"),
        ("batched / naive", f"{r['ratio']:>10}x", "target >= 20x, >= 20,000 events/s"),
        ("emit()", f"{r['emit_ns']:>10} ns", "lookup + buffer put"),
        ("dict.get + deque.append", f"{r['baseline_ns']:>10} ns", "baseline"),
        ("emit / baseline", f"{r['emit_ratio']:>10}x", ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"dispatch_throughput ({'quick' if r['quick'] else 'full'})")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, within a minute")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        asyncio.run(_serve_receiver())
        return
    # emit_cost closes clients whose target never existed: their "undelivered" warnings are noise.
    logging.getLogger("vochi_crm_client").setLevel(logging.ERROR)
    result = anyio.run(run, args.quick)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
