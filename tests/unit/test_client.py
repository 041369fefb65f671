"""CrmClient over MockTransport, a fake clock and an in-memory matrix: routing, misses, drain."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import anyio
import httpx
import pytest

from vochi_crm_client._cache import NOT_LOADED, NotLoaded
from vochi_crm_client._client import ClientState, CrmClient
from vochi_crm_client._config import DispatchConfig
from vochi_crm_client._event import CallEvent
from vochi_crm_client._exceptions import LoadError
from vochi_crm_client.testing import FakeClock, seeded_rng, settle

pytestmark = pytest.mark.anyio

TARGETS = {"retailcrm": "http://retailcrm.test/api/events", "uon": "http://uon.test/api/events"}


class MemoryMatrix:
    """A stand-in for EnablementMatrix: loads are gated so a test can hold them in flight."""

    def __init__(self, known: dict[str, frozenset[str]], *, preloaded: bool = True) -> None:
        self.known = known
        self.loaded: dict[str, frozenset[str] | None] = dict(known) if preloaded else {}
        self.gate = anyio.Event()
        if preloaded:
            self.gate.set()
        self.loads = 0
        self.failures = 0

    def lookup(self, number: str) -> frozenset[str] | NotLoaded | None:
        return self.loaded.get(number, NOT_LOADED)

    def lookup_token(self, token: str) -> str | NotLoaded | None:
        return token if token in self.known else None

    async def integrations_for(self, number: str) -> frozenset[str]:
        self.loads += 1
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise LoadError("database down")
        self.loaded[number] = self.known.get(number)
        return self.known.get(number) or frozenset()

    async def resolve_token(self, token: str) -> str | None:
        return token if token in self.known else None

    def stats(self) -> dict[str, Any]:
        return {"loads": self.loads}


class Receivers:
    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("refused")
        events = json.loads(request.content)["events"]
        self.events[request.url.host].extend(events)
        return httpx.Response(202, json={"accepted": len(events), "duplicates": 0, "rejected": []})


def hangup(uid: str, ent: str = "0367") -> CallEvent:
    return CallEvent(enterprise_number=ent, event_type="hangup", call_unique_id=uid)


def client(matrix: Any, receivers: Receivers, clock: FakeClock, **dispatch: Any) -> CrmClient:
    dispatch.setdefault("linger", 0)
    return CrmClient(
        targets=TARGETS,
        matrix=matrix,
        dispatch=DispatchConfig(**dispatch),
        transport=httpx.MockTransport(receivers),
        clock=clock,
        sleep=clock.sleep,
        rng=seeded_rng(3),
    )


async def test_events_reach_exactly_the_enabled_targets() -> None:
    matrix = MemoryMatrix(
        {"0367": frozenset({"retailcrm"}), "0400": frozenset({"retailcrm", "uon", "bitrix24"})}
    )
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        crm.emit(hangup("1.1", "0367"))
        crm.emit(hangup("1.2", "0400"))
        await settle()
    assert [e["call_unique_id"] for e in receivers.events["retailcrm.test"]] == ["1.1", "1.2"]
    assert [e["call_unique_id"] for e in receivers.events["uon.test"]] == ["1.2"]


async def test_unknown_and_disabled_enterprises_are_counted_not_sent() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"bitrix24"})})
    matrix.loaded["9999"] = None
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        crm.emit(hangup("1.1", "9999"))
        crm.emit(hangup("1.2", "0367"))
        await settle()
        stats = crm.stats()
    assert stats["unknown_enterprise"] == 1
    assert stats["no_target"] == 1
    assert receivers.events == {}


async def test_a_miss_parks_the_event_and_loads_once_without_the_caller_waiting() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})}, preloaded=False)
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        for i in range(50):
            assert crm.emit(hangup(f"1.{i}")) is None  # returns at once, load still gated
        await settle()
        assert crm.stats()["pending"] == 50
        assert matrix.loads == 1
        matrix.gate.set()
        await settle()
        assert crm.stats()["pending"] == 0
    assert len(receivers.events["retailcrm.test"]) == 50


async def test_the_pending_buffer_is_bounded() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})}, preloaded=False)
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock, pending_max=10) as crm:
        for i in range(15):
            crm.emit(hangup(f"1.{i}"))
        assert crm.stats()["pending_overflow"] == 5
        matrix.gate.set()
        await settle()
    assert len(receivers.events["retailcrm.test"]) == 10


async def test_a_failed_load_is_retried_with_backoff() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})}, preloaded=False)
    matrix.gate.set()
    matrix.failures = 2
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        crm.emit(hangup("1.1"))
        await clock.run_for(5, step=0.1)
        assert crm.stats()["resolve_errors"] == 2
    assert len(receivers.events["retailcrm.test"]) == 1


async def test_emit_never_raises_while_every_target_is_down() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm", "uon"})})
    clock, receivers = FakeClock(), Receivers()
    receivers.down = True
    async with client(matrix, receivers, clock, drain_timeout=0.5) as crm:
        for i in range(1000):
            crm.emit(hangup(f"1.{i}"))
        await clock.run_for(3, step=0.1)
        assert (
            crm.stats()["targets"]["retailcrm"]["queued"]
            + crm.stats()["targets"]["retailcrm"]["in_flight"]
            == 1000
        )
        receivers.down = False
        await clock.run_for(3, step=0.1)
    assert len(receivers.events["retailcrm.test"]) == 1000


async def test_closing_flushes_queued_events_despite_a_long_linger() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock, linger=60.0) as crm:
        for i in range(5):
            crm.emit(hangup(f"1.{i}"))
    assert len(receivers.events["retailcrm.test"]) == 5
    assert crm.undelivered == {"retailcrm": 0, "uon": 0}


async def test_closing_gives_up_after_the_drain_timeout_and_reports_the_loss() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
    clock, receivers = FakeClock(), Receivers()
    receivers.down = True
    closed = anyio.Event()
    holder: list[CrmClient] = []

    async def run() -> None:
        async with client(matrix, receivers, clock, drain_timeout=5.0) as crm:
            holder.append(crm)
            for i in range(7):
                crm.emit(hangup(f"1.{i}"))
        closed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await clock.run_for(4.9, step=0.1)
        assert not closed.is_set()
        await clock.run_for(0.2, step=0.1)
        assert closed.is_set()
    crm = holder[0]
    assert crm.state is ClientState.CLOSED
    assert crm.undelivered["retailcrm"] == 7
    assert crm.stats()["targets"]["retailcrm"]["dropped"]["shutdown"] == 7


async def test_emit_after_close_is_counted_and_dropped() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        pass
    crm.emit(hangup("1.1"))
    assert crm.stats()["not_open"] == 1


async def test_emit_rejects_anything_but_a_call_event() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        with pytest.raises(TypeError):
            crm.emit({"enterprise_number": "0367"})  # type: ignore[arg-type]


async def test_stats_and_health_are_json_serialisable() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        crm.emit(hangup("1.1"))
        await settle()
        stats = json.loads(json.dumps(crm.stats()))
        health = json.loads(json.dumps(crm.health()))
    target = stats["targets"]["retailcrm"]
    for key in ("queued", "sent", "delivered", "rejected", "retried", "batches", "latency_ms"):
        assert key in target
    assert set(target["dropped"]) >= {"expired", "superseded", "overflow", "rejected"}
    assert target["breaker"]["state"] == "closed"
    assert stats["matrix"] == {"loads": 0}
    assert health["status"] == "ok"


async def test_integrations_for_and_resolve_token_go_to_the_matrix() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
    clock, receivers = FakeClock(), Receivers()
    async with client(matrix, receivers, clock) as crm:
        assert await crm.integrations_for("0367") == frozenset({"retailcrm"})
        assert await crm.resolve_token("0367") == "0367"
        assert await crm.resolve_token("nope") is None


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        CrmClient(targets=TARGETS)
    with pytest.raises(ValueError, match="URL"):
        CrmClient(targets={"retailcrm": "ftp://x"}, dsn="postgresql://x")
    with pytest.raises(ValueError, match="batch_max"):
        CrmClient(targets=TARGETS, dsn="postgresql://x", dispatch=DispatchConfig(batch_max=0))


async def test_a_cancelled_owner_still_drains_then_the_cancellation_proceeds() -> None:
    matrix = MemoryMatrix({"0367": frozenset({"retailcrm"})})
    clock, receivers = FakeClock(), Receivers()
    receivers.down = True
    scopes: list[anyio.CancelScope] = []
    holder: list[CrmClient] = []
    finished = anyio.Event()

    async def owner() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            async with client(matrix, receivers, clock, drain_timeout=5.0) as crm:
                holder.append(crm)
                crm.emit(hangup("1.1"))
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(owner)
        await settle()
        scopes[0].cancel()
        await clock.run_for(2.0, step=0.5)
        assert holder[0].state is ClientState.CLOSING  # draining, shielded from the cancel
        receivers.down = False
        await clock.run_for(4.0, step=0.5)
        assert finished.is_set()
    assert receivers.events["retailcrm.test"][0]["call_unique_id"] == "1.1"
    assert holder[0].undelivered == {"retailcrm": 0, "uon": 0}


async def test_posts_carry_json_and_the_user_agent_and_the_given_transport_is_closed_once() -> None:
    seen: list[httpx.Request] = []
    receivers = Receivers()

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return receivers(request)

    class Counted(httpx.MockTransport):
        closed = 0

        async def aclose(self) -> None:
            Counted.closed += 1

    matrix = MemoryMatrix({"0400": frozenset({"retailcrm", "uon"})})
    clock = FakeClock()
    crm = CrmClient(
        targets=TARGETS,
        matrix=matrix,
        dispatch=DispatchConfig(linger=0),
        transport=Counted(record),
        clock=clock,
        sleep=clock.sleep,
        rng=seeded_rng(3),
    )
    async with crm:
        crm.emit(hangup("1.1", "0400"))
        await settle()
    assert sorted(str(r.url) for r in seen) == sorted(TARGETS.values())
    for request in seen:  # one transport shared by both targets: the same request shape
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"].startswith("vochi-crm-client/")
        assert request.headers["content-length"] == str(len(request.content))
        assert request.headers["host"] == request.url.host
        assert json.loads(request.content)["events"][0]["call_unique_id"] == "1.1"
        assert set(request.extensions["timeout"]) == {"connect", "read", "write", "pool"}
    assert Counted.closed == 1
