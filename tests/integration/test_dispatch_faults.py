"""Faults on real sockets: the CRM service down 20 s, answering after 2 s, one enterprise flooding.

The receiver is a real HTTP server on 127.0.0.1; the matrix reads the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from adapters.call_service import CallServiceSettings, create_app
from tests.integration._servers import RecordingReceiver
from tests.support.pg import create_enterprise
from tests.support.procs import ThreadedServer
from vochi_crm_client import BreakerConfig, CallEvent, CrmClient, DispatchConfig

TOKEN = "375291110001"


async def _seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await create_enterprise(conn, "0367", name2=TOKEN, integrations={"retailcrm": True})
        await create_enterprise(
            conn, "0400", name2="375291110002", integrations={"retailcrm": True}
        )
    finally:
        await conn.close()


def _call(uid: str, phases: tuple[str, ...] = ("dial", "bridge", "hangup"), **extra: Any) -> list:
    bodies = {
        "dial": {"UniqueId": uid, "Phone": "+375291234567", "Extensions": ["150"], "CallType": 0},
        "bridge": {"UniqueId": uid, "Channel": "SIP/150-1", "Exten": "150"},
        "hangup": {
            "UniqueId": uid,
            "Phone": "+375291234567",
            "Extensions": ["150"],
            "CallType": 0,
            "DateReceived": "2025-11-26 10:00:00",
            "StartTime": "2025-11-26 10:00:01",
            "EndTime": "2025-11-26 10:01:00",
            "CallStatus": "2",
            "Trunk": "0001363",
            **extra,
        },
    }
    return [(phase, bodies[phase]) for phase in phases]


class Stack:
    def __init__(self, recorder: RecordingReceiver, receiver: ThreadedServer, client: httpx.Client):
        self.recorder = recorder
        self.receiver = receiver
        self.client = client

    def post(self, phase: str, body: dict[str, Any]) -> float:
        """POST one webhook; returns its latency in seconds."""
        started = time.perf_counter()
        reply = self.client.post(f"/{phase}", json=body, headers={"Token": TOKEN})
        elapsed = time.perf_counter() - started
        assert reply.status_code == 200, reply.text
        return elapsed

    def post_calls(self, calls: list[list]) -> list[float]:
        return [self.post(phase, body) for call in calls for phase, body in call]

    def target_stats(self) -> dict[str, Any]:
        return self.client.get("/stats").json()["targets"]["retailcrm"]


@pytest.fixture
def stack(database_url: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    asyncio.run(_seed(database_url))
    options = getattr(request, "param", {})
    recorder = RecordingReceiver()
    with ThreadedServer(recorder, lifespan="off") as receiver:
        settings = CallServiceSettings(
            dsn=database_url,
            targets={"retailcrm": f"{receiver.url}/api/events"},
            client_options=options,
        )
        with (
            ThreadedServer(create_app(settings), lifespan="on") as service,
            httpx.Client(base_url=service.url, timeout=10) as client,
        ):
            s = Stack(recorder, receiver, client)
            s.post_calls([_call("warm.1")])  # the token and the matrix are loaded from here on
            ok = recorder.wait_for(lambda r: len(r.events) == 3, timeout=10)
            assert ok, (recorder.keys, client.get("/stats").json())
            yield s


OUTAGE_OPTIONS = {
    "dispatch": DispatchConfig(popup_ttl=5.0),
    "breaker": BreakerConfig(consecutive_failures=3, open_base=0.5, open_max=2.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("stack", [OUTAGE_OPTIONS], indirect=True)
def test_a_20s_outage_loses_no_history_and_drops_only_stale_popups(stack: Stack) -> None:
    stack.receiver.stop(hold_port=True)  # connections refused from now on
    down_at = time.monotonic()
    ringing = [_call(f"ring.{i}", ("dial",)) for i in range(10)]  # never answered: they expire
    early = [_call(f"early.{i}") for i in range(10)]  # complete: the hangup supersedes popups
    recovered = [_call(f"rec.{i}", ("hangup",), origin="download") for i in range(5)]
    stack.post_calls(ringing + early + recovered)
    time.sleep(max(0.0, down_at + 10 - time.monotonic()))
    late = [_call(f"late.{i}") for i in range(10)]
    stack.post_calls(late)
    down_stats = stack.target_stats()
    assert down_stats["breaker"]["state"] != "closed"
    assert down_stats["delivered"] == 3  # the warm-up call only
    time.sleep(max(0.0, down_at + 20 - time.monotonic()))

    stack.receiver.start()
    history = {f"0367:{p}.{i}:hangup" for p in ("early", "late") for i in range(10)}
    history |= {f"0367:rec.{i}:hangup" for i in range(5)}
    assert stack.recorder.wait_for(lambda r: history <= set(r.keys), timeout=30)

    outage_events = [e for e in stack.recorder.events if not e["call_unique_id"].startswith("warm")]
    assert {e["idempotency_key"] for e in outage_events} == history
    assert {e["origin"] for e in outage_events if e["call_unique_id"].startswith("rec")} == {
        "download"
    }
    stats = stack.target_stats()
    # The 10 unanswered dials expired; the 40 popups of answered calls were superseded by their
    # hangups (or, for a call posted before the first failure was seen, expired): none was sent.
    assert stats["dropped"]["expired"] >= 10
    assert stats["dropped"]["expired"] + stats["dropped"]["superseded"] == 50
    assert stats["dropped"]["overflow"] == 0
    assert stats["retried"] > 0
    assert stats["queued"] == 0


@pytest.mark.slow
def test_a_slow_crm_service_never_slows_the_webhooks(stack: Stack) -> None:
    healthy = stack.post_calls([_call(f"fast.{i}") for i in range(20)])
    stack.recorder.delay = 2.0  # within the 2.5 s attempt timeout: slow, not failing
    slow = stack.post_calls([_call(f"slow.{i}") for i in range(20)])
    keys = {f"0367:slow.{i}:hangup" for i in range(20)}
    assert stack.recorder.wait_for(lambda r: keys <= set(r.keys), timeout=30)
    healthy_median, slow_median = statistics.median(healthy), statistics.median(slow)
    assert slow_median < 4 * healthy_median, (healthy_median, slow_median)
    assert stack.target_stats()["latency_ms"]["batch"]["max"] >= 2000


async def test_one_enterprise_flood_does_not_delay_another(database_url: str) -> None:
    await _seed(database_url)
    recorder = RecordingReceiver()
    recorder.delay = 0.02  # every POST costs the receiver 20 ms: the flood is a real backlog
    with ThreadedServer(recorder, lifespan="off") as receiver:
        async with CrmClient(
            dsn=database_url, targets={"retailcrm": f"{receiver.url}/api/events"}
        ) as crm:
            assert await crm.integrations_for("0400") == frozenset({"retailcrm"})
            flood = [
                CallEvent(enterprise_number="0367", event_type="hangup", call_unique_id=f"f.{i}")
                for i in range(20_000)
            ]
            other = CallEvent(enterprise_number="0400", event_type="hangup", call_unique_id="b.1")
            started = time.monotonic()
            for event in flood:
                crm.emit(event)
            crm.emit(other)
            with anyio.fail_after(60):
                while len(recorder.received) < 20_001:
                    await anyio.sleep(0.05)
    received = recorder.received
    arrived = next(r for r in received if r.event["enterprise_number"] == "0400")
    last = max(r.at for r in received)
    batches = max(r.batch for r in received)
    assert batches >= 100
    assert arrived.batch <= 2 * crm.config.max_in_flight  # in the first round of batches
    assert arrived.at - started < (last - started) / 5
