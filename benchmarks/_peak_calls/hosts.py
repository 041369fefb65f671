"""The simulated Asterisk hosts: one process that plays the offered calls as webhooks.

It must never be the bottleneck, so its HTTP client is the cheapest one that is still honest:
pre-rendered HTTP/1.1 requests written on keep-alive connections by an ``asyncio.Protocol``,
responses parsed by their ``Content-Length`` (no client library, no per-request objects beyond a
future), on uvloop's event loop where it is installed (about a fifth less CPU than asyncio's own
loop for the same webhooks). Each host (enterprise) has its own connections, opened when all of its
connections are busy, as a real host's daemon does; each webhook has the hosts' 3 s timeout and no
retry (a connection the server closed while idle is the exception: that request is resent once on a
new connection, as every HTTP client does). Its cost is measured and reported: the CPU it used and
its lag (how late each webhook left against its schedule). It runs at a higher scheduling priority
(``NICE``, where permitted), so that on a loaded machine its timestamps are not delayed by the very
processes it measures.

Calls arrive as a Poisson process at each segment's rate; a call's template is drawn by the
mix's shares, its enterprise uniformly. ``UniqueId`` is ``<segment phase>.<n>``, so every
record downstream (outbox rows, RetailCRM calls) tells which segment it belongs to.

Runs as ``peak_calls.py --role hosts --plan PLAN.json``; prints ``plan <webhooks> <calls>``, then
``progress <sent> <answered>`` lines, then writes its records to ``plan["out"]`` (JSON).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

from _peak_calls.calls import Template, render, templates

TIMEOUT = 3.0  # the hosts' webhook timeout (docs/asterisk.md#host-webhooks)
NICE = -10
MAX_CONNECTIONS_PER_HOST = 64


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.used = False
        self.got_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"content-length:")
        stop = head.find(b"\r\n", start)
        length = int(head[start + 15 : stop if stop >= 0 else None]) if start >= 0 else 0
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        if b"connection: close" in head:
            self.close()
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.got_bytes = False
        self.used = True
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


@dataclass
class _Host:
    """One simulated Asterisk host: its token, its call service, its idle connections."""

    token: bytes
    address: tuple[str, int]
    header: bytes
    idle: list[_Connection] = field(default_factory=list)
    open: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    async def acquire(self) -> _Connection:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
                self.open -= 1
            if self.open < MAX_CONNECTIONS_PER_HOST:
                self.open += 1
                try:
                    transport, conn = await asyncio.get_running_loop().create_connection(
                        _Connection, *self.address
                    )
                except BaseException:
                    self.open -= 1
                    raise
                if conn.transport is None:  # uvloop may call connection_made() a moment later
                    conn.connection_made(transport)
                return conn
            self.freed.clear()
            await self.freed.wait()

    def release(self, conn: _Connection) -> None:
        if conn.closed:
            self.open -= 1
        else:
            self.idle.append(conn)
        self.freed.set()


@dataclass
class _Run:
    plan: dict[str, Any]
    templates: list[Template]
    hosts: list[_Host]
    calls: list[tuple[str, int, int, float]] = field(default_factory=list)
    hooks: list[tuple[int, int, float, float, int, int]] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    resent: int = 0
    sent: int = 0


def _build_calls(run: _Run) -> list[tuple[float, int, int]]:
    """The offered calls of every segment, and their webhooks as a schedule (time, call, step)."""
    rng = random.Random(run.plan.get("seed", 1))
    weights = [t.share for t in run.templates]
    t0 = float(run.plan["t0"])
    schedule: list[tuple[float, int, int]] = []
    for segment in run.plan["segments"]:
        start, end = float(segment["start"]), float(segment["start"]) + float(segment["duration"])
        rate = float(segment["rate"])
        t = start
        # Bounded: a Poisson count stays far below 3x its mean over these durations.
        for seq in range(1, int(rate * (end - start) * 3) + 10):
            t += rng.expovariate(rate)
            if t >= end:
                break
            tpl = rng.choices(range(len(run.templates)), weights)[0]
            ent = rng.randrange(len(run.hosts))
            index = len(run.calls)
            run.calls.append((f"{segment['phase']}.{seq}", ent, tpl, t0 + t))
            for step_no, step in enumerate(run.templates[tpl].steps):
                schedule.append((t0 + t + step.at, index, step_no))
    schedule.sort()
    return schedule


async def _send(run: _Run, call_no: int, step_no: int) -> None:
    uid, ent, tpl, _ = run.calls[call_no]
    host = run.hosts[ent]
    step = run.templates[tpl].steps[step_no]
    body = render(step.body, uid.encode(), host.token)
    request = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
        step.path.encode(),
        host.header,
        len(body),
        body,
    )
    sent = time.time()
    started = time.perf_counter()
    status, queued = 0, 0
    for attempt in range(2):
        conn = None
        try:
            async with asyncio.timeout(TIMEOUT - (time.perf_counter() - started)):
                conn = await host.acquire()
                reused = conn.used
                code, reply = await conn.request(request)
            status, queued = code, int(b'"queued"' in reply)
            host.release(conn)
            break
        except TimeoutError:
            status = -1
        except OSError:  # ConnectionError included: refused, reset, closed under us
            status = 0
            if conn is not None and reused and not conn.got_bytes and attempt == 0:
                run.resent += 1
                conn.close()
                host.release(conn)
                continue
        if conn is not None:
            conn.close()
            host.release(conn)
        break
    ack_ms = (time.perf_counter() - started) * 1000
    run.hooks.append((call_no, step_no, sent, ack_ms, status, queued))


async def _progress(run: _Run, total: int) -> None:
    while True:
        print(f"progress {run.sent} {len(run.hooks)} {total}", flush=True)
        await asyncio.sleep(0.5)


async def _play(run: _Run) -> None:
    schedule = _build_calls(run)
    print(f"plan {len(schedule)} {len(run.calls)}", flush=True)
    tasks: set[asyncio.Task[None]] = set()
    reporter = asyncio.create_task(_progress(run, len(schedule)))
    try:
        for due, call_no, step_no in schedule:
            delay = due - time.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            run.lags.append(max(0.0, time.time() - due))
            task = asyncio.create_task(_send(run, call_no, step_no))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            run.sent += 1
        while tasks:  # each is bounded by the 3 s timeout (twice, at worst, for a resend)
            await asyncio.gather(*list(tasks))
    finally:
        reporter.cancel()
        for host in run.hosts:
            for conn in host.idle:
                conn.close()


def main(plan_path: str) -> int:
    with open(plan_path, encoding="utf-8") as fh:
        plan = json.load(fh)
    hosts = []
    for token, target in plan["enterprises"]:
        address = tuple(plan["targets"][target])
        header = (
            f"Host: {address[0]}:{address[1]}\r\nContent-Type: application/json\r\n"
            f"Token: {token}\r\n"
        ).encode()
        hosts.append(_Host(token.encode(), (address[0], int(address[1])), header))
    run = _Run(plan=plan, templates=templates(), hosts=hosts)
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        import uvloop
    except ImportError:  # not on this platform: asyncio's own loop, at a higher cost
        asyncio.run(_play(run))
    else:
        uvloop.run(_play(run))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    lags = sorted(run.lags) or [0.0]
    result = {
        "calls": run.calls,
        "hooks": run.hooks,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "lag_p50_ms": round(lags[len(lags) // 2] * 1000, 3),
        "lag_p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000, 3),
        "lag_max_ms": round(lags[-1] * 1000, 3),
        "resent": run.resent,
        "niceness": os.nice(0),
    }
    with open(plan["out"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, separators=(",", ":"))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
