"""Delivery workers against the sandbox on a real PostgreSQL: dead letters, 503s, breakers,
isolation between enterprises, and the journal."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from retailcrm_service.crm.pacing import PacingConfig
from retailcrm_service.pipeline.delivery import DeliveryConfig, DeliveryService
from retailcrm_service.pipeline.outbox import GroupCommitter, OutboxConfig, StoredEvent
from retailcrm_service.sandbox import SandboxServer
from retailcrm_service.storage.enterprise_configs import load_config
from retailcrm_service.storage.journal import IntegrationLogWriter, pg_sink
from tests.support.pipeline import add_enterprise, prepare_sandbox
from vochi_crm_client._backoff import BackoffPolicy
from vochi_crm_client._config import BreakerConfig
from vochi_crm_client._event import idempotency_key


class Configs:
    """The service's own loader, read through on every call (no cache needed here)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get(self, number: str) -> Any:
        return await load_config(self._pool, number, secret_key=None)


def dial(uid: str, enterprise: str = "0367") -> StoredEvent:
    payload = {"UniqueId": uid, "Phone": "+375291234567", "Extensions": ["150"], "CallType": 0}
    return StoredEvent(
        enterprise_number=enterprise,
        event_type="dial",
        call_unique_id=uid,
        payload=payload,
        origin="live",
        idempotency_key=idempotency_key(enterprise, uid, "dial", ["150"]),
    )


@pytest.fixture
def crm() -> Iterator[SandboxServer]:
    with SandboxServer(rate_limit=True, demo_data=False) as server:
        prepare_sandbox(server.url, server.api_key)
        yield server


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    try:
        yield p
    finally:
        await p.close()


def _service(pool: asyncpg.Pool, **kwargs: Any) -> DeliveryService:
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2, **kwargs)
    outbox = OutboxConfig(retry=BackoffPolicy(base=0.05, cap=0.2))
    return DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)


async def _until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _rows(db: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM retailcrm_outbox ORDER BY id")]


async def test_refused_request_is_dead_lettered_with_its_error_and_journaled(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    bare_key = secrets.token_hex(16)
    crm.seed({"name": "bare", "api_key": bare_key})  # an account without a telephony module
    await add_enterprise(db, crm.url, bare_key)
    async with IntegrationLogWriter(sink=pg_sink(pool)) as logs:
        service = _service(pool)
        service._logs = logs
        async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
            await committer.submit([dial("1.1")])
            await _until(lambda: _settled(db))
        await logs.flush()
    (row,) = await _rows(db)
    assert row["state"] == "dead"
    assert "Telephony not enabled" in row["last_error"]
    journal = await db.fetch("SELECT * FROM integration_logs")
    assert [(j["status"], j["call_unique_id"]) for j in journal] == [("error", "1.1")]
    assert bare_key not in json.dumps([dict(j) for j in journal], default=str)


async def _settled(db: asyncpg.Connection) -> bool:
    return not await db.fetchval("SELECT count(*) FROM retailcrm_outbox WHERE state = 'pending'")


async def test_rate_limit_answers_slow_the_key_and_the_events_still_arrive(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(endpoint="telephony/call/event", mode="error", status=503, times=2)
    service = _service(pool)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([dial(f"2.{i}") for i in range(3)])
        await _until(lambda: _settled(db))
        stats = service.stats()
    assert [r["state"] for r in await _rows(db)] == ["delivered"] * 3
    assert stats["enterprises"]["0367"]["rate_limited"] == 2
    assert next(iter(service.pacer.stats().values()))["penalties"] == 2
    assert len(crm.state()["accounts"]["test"]["events"]) == 3


async def test_failing_account_opens_its_breaker_and_defers_without_spending_attempts(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(endpoint="telephony/*", mode="error", status=500)
    breaker = BreakerConfig(consecutive_failures=2, open_base=30.0, open_max=60.0)
    service = _service(pool, breaker=breaker)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([dial(f"3.{i}") for i in range(5)])

        async def opened() -> bool:
            return service.stats()["breakers"].get("0367") == "open"

        await _until(opened)
        await asyncio.sleep(0.5)
        # A claimed row counts its attempt until its settle gives a deferral's back: read
        # when no row is held (the retried rows are claimed again, and deferred, meanwhile).
        attempts: list[int] = []

        async def unheld() -> bool:
            rows = await _rows(db)
            attempts[:] = [r["attempts"] for r in rows]
            return not any(r["lease_owner"] for r in rows)

        await _until(unheld)
    # Two real failures tripped it; only requests already in flight beside them failed too
    # (popup_concurrency at once), everything else waits without using up its attempts.
    concurrency = service.config.popup_concurrency
    assert 2 <= sum(attempts) <= 2 + concurrency - 1
    assert attempts.count(0) >= len(attempts) - (2 + concurrency - 1)
    assert all(r["state"] == "pending" for r in await _rows(db))


async def test_an_accounts_popups_are_sent_side_by_side_up_to_the_concurrency(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """With RetailCRM's answers slow (a distant account), one popup at a time would cap an
    account at a few calls per second: up to popup_concurrency of its popups are in flight at
    once, each of another call, and the key's pacer still spaces them."""
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(endpoint="telephony/call/event", mode="latency", latency_ms=400)
    service = _service(pool, popup_concurrency=3)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([dial(f"13.{i}") for i in range(6)])
        await _until(lambda: _settled(db))
    assert [r["state"] for r in await _rows(db)] == ["delivered"] * 6
    received = sorted(
        r["receivedTs"]
        for r in crm.state(requests=50)["requests"]
        if r.get("endpoint") == "telephony/call/event"
    )
    assert len(received) == 6
    # Three arrived within one answer's delay (400 ms), and never more than three.
    in_flight = [sum(1 for t in received if start <= t < start + 0.4) for start in received]
    assert max(in_flight) == 3


async def test_a_stalled_account_does_not_hold_up_another_enterprise(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    with SandboxServer(rate_limit=True, demo_data=False) as slow:
        prepare_sandbox(slow.url, slow.api_key)
        slow.add_fault(endpoint="telephony/*", mode="latency", latency_ms=2500)
        await add_enterprise(db, slow.url, slow.api_key, number="0500")
        await add_enterprise(db, crm.url, crm.api_key)
        service = _service(pool, close_timeout=0.5)
        async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
            await committer.submit([dial(f"4.{i}", "0500") for i in range(3)])
            await asyncio.sleep(0.2)  # the slow enterprise's first request is in flight
            await committer.submit([dial(f"5.{i}") for i in range(3)])

            async def fast_done() -> bool:
                return len(crm.state()["accounts"]["test"]["events"]) == 3

            await _until(fast_done)
            # when the healthy enterprise is done, the stalled one has barely started
            slow_pending = await db.fetchval(
                "SELECT count(*) FROM retailcrm_outbox"
                " WHERE enterprise_number = '0500' AND state = 'pending'"
            )
    assert slow_pending >= 2


async def test_work_is_handed_back_inside_the_lease_so_nothing_is_sent_twice(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(endpoint="telephony/call/event", mode="latency", latency_ms=300)
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2)
    outbox = OutboxConfig(lease_seconds=1.0, retry=BackoffPolicy(base=0.05, cap=0.2))
    one, two = (
        DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)
        for _ in range(2)
    )
    # two workers: had the first overrun its lease, the second would re-send the same rows
    async with one, two, GroupCommitter(pool=pool, on_commit=one.wake) as committer:
        await committer.submit([dial(f"6.{i}") for i in range(6)])
        await _until(lambda: _settled(db))
    rows = await _rows(db)
    assert [r["state"] for r in rows] == ["delivered"] * 6
    # rows handed back unsent kept their attempt; every popup reached RetailCRM exactly once
    assert all(r["attempts"] == 1 for r in rows)
    sent = [e["event"]["callExternalId"] for e in crm.state()["accounts"]["test"]["events"]]
    assert sorted(sent) == sorted(f"6.{i}" for i in range(6))


def _hangup(uid: str, date: str, call_type: object = 0, origin: str = "download") -> StoredEvent:
    payload = {
        "UniqueId": uid,
        "Phone": "+375291234567",
        "Extensions": ["150"],
        "CallType": call_type,
        "DateReceived": date,
        "StartTime": date,
        "EndTime": date,
        "CallStatus": "2",
    }
    return StoredEvent(
        enterprise_number="0367",
        event_type="hangup",
        call_unique_id=uid,
        payload=payload,
        origin=origin,
        idempotency_key=idempotency_key("0367", uid, "hangup"),
    )


async def test_a_row_the_mapping_cannot_convert_is_dead_lettered_and_the_rest_delivered(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """A deterministic mapping failure (a date at the calendar's edge shifted into the account's
    zone overflows) fails on every attempt: it is dead-lettered with its reason, not re-claimed
    forever, and the enterprise's other calls are delivered."""
    await add_enterprise(db, crm.url, crm.api_key)
    await db.execute(
        """UPDATE enterprises SET integrations_config = jsonb_set(integrations_config,
               '{retailcrm,account_timezone}', '"Asia/Tokyo"') WHERE number = '0367'"""
    )
    service = _service(pool)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit(
            [
                _hangup("7.1", "2025-11-26 10:00:00"),
                _hangup("7.2", "9999-12-31 23:59:59"),
                _hangup("7.3", "2025-11-26 10:05:00", call_type="²"),
            ]
        )
        await _until(lambda: _settled(db))
    rows = {r["call_unique_id"]: r for r in await _rows(db)}
    assert rows["7.1"]["state"] == "delivered"
    assert rows["7.2"]["state"] == "dead"
    assert rows["7.2"]["last_error"].startswith("unmappable: OverflowError")
    assert rows["7.3"]["state"] in ("delivered", "skipped")  # '²' is no CallType, and no crash
    uploaded = {c["externalId"] for c in crm.state()["accounts"]["test"]["calls"]}
    assert "7.1" in uploaded
    assert "7.2" not in uploaded


async def test_event_kinds_the_admin_switched_off_are_skipped_and_never_sent(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """«События»: incoming popups and call history off, outgoing popups on."""
    await add_enterprise(
        db,
        crm.url,
        crm.api_key,
        events={"incoming_popups": False, "outgoing_popups": True, "call_history": False},
    )
    outgoing = dial("8.2")
    outgoing.payload["CallType"] = 1
    service = _service(pool)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([dial("8.1"), outgoing, _hangup("8.3", "2025-11-26 10:00:00")])
        await _until(lambda: _settled(db))
    rows = {r["call_unique_id"]: r for r in await _rows(db)}
    assert rows["8.1"]["state"] == "skipped"
    assert rows["8.1"]["last_error"] == "incoming_popups switched off"
    assert rows["8.2"]["state"] == "delivered"
    assert rows["8.3"]["state"] == "skipped"
    assert rows["8.3"]["last_error"] == "call_history switched off"
    account = crm.state()["accounts"]["test"]
    assert [e["event"]["type"] for e in account["events"]] == ["out"]
    assert account["calls"] == []


async def test_a_hangup_closes_a_card_only_when_its_calls_dial_popup_was_shown(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """9.1 had its card shown: its hangup closes it. 9.2's dial came after its hangup (never
    shown) and 9.3's dial never came: no card to close, no request. All three get history."""
    await add_enterprise(db, crm.url, crm.api_key)
    date = "2025-11-26 10:00:00"
    service = _service(pool)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([dial("9.1")])
        await committer.submit([_hangup("9.1", date, origin="live")])
        await committer.submit([_hangup("9.2", date, origin="live")])
        await committer.submit([dial("9.2"), _hangup("9.3", date, origin="live")])
        await _until(lambda: _settled(db))
    rows = {(r["call_unique_id"], r["event_type"]): r for r in await _rows(db)}
    assert rows["9.1", "hangup"]["popup_state"] == "delivered"
    assert rows["9.2", "dial"]["state"] == "superseded"
    for uid in ("9.2", "9.3"):
        assert rows[uid, "hangup"]["popup_state"] == "skipped"
    assert {rows[uid, "hangup"]["state"] for uid in ("9.1", "9.2", "9.3")} == {"delivered"}
    account = crm.state()["accounts"]["test"]
    sent = [(e["event"]["type"], e["event"].get("callExternalId")) for e in account["events"]]
    assert sent == [("in", "9.1"), ("hangup", "9.1")]
    assert sorted(c["externalId"] for c in account["calls"]) == ["9.1", "9.2", "9.3"]


async def test_one_by_one_retry_of_a_rejected_batch_hands_back_what_the_lease_cannot_cover(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """A refused batch is retried call by call; that retry stops at the lease budget and hands
    the rest back, so another instance never takes rows this one is still sending."""
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(endpoint="telephony/calls/upload", mode="error", status=400, times=1)
    crm.add_fault(endpoint="telephony/calls/upload", mode="latency", latency_ms=300)
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2)
    outbox = OutboxConfig(lease_seconds=1.0, retry=BackoffPolicy(base=0.05, cap=0.2))
    one, two = (
        DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)
        for _ in range(2)
    )

    async def all_claimed_by_one() -> bool:
        owners = await db.fetch("SELECT lease_owner FROM retailcrm_outbox")
        return [r["lease_owner"] for r in owners] == [one.store.owner] * 6

    async with one, GroupCommitter(pool=pool, on_commit=one.wake) as committer:
        await committer.submit([_hangup(f"8.{i}", f"2025-11-26 10:0{i}:00") for i in range(6)])
        # The second instance starts once the first holds the whole batch: two claims running
        # at the same moment may split the rows, and the refusal then meets a single call.
        await _until(all_claimed_by_one)
        async with two:
            await _until(lambda: _settled(db), timeout=30)
    assert [r["state"] for r in await _rows(db)] == ["delivered"] * 6
    calls = crm.state()["accounts"]["test"]["calls"]
    assert sorted(c["externalId"] for c in calls) == [f"8.{i}" for i in range(6)]
    # each call was uploaded by one instance only: no re-upload after a lapsed lease
    assert [c["duplicates"] for c in calls] == [0] * 6


async def test_a_popup_that_expired_while_waiting_for_the_keys_turn_is_not_sent(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    await add_enterprise(db, crm.url, crm.api_key)
    # one telephony request per 2.5 s, popups worth sending for 1 s
    pacing = PacingConfig(telephony_rps=0.4)
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2, pacing=pacing)
    outbox = OutboxConfig(popup_ttl=1.0, retry=BackoffPolicy(base=0.05, cap=0.2))
    service = DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)
    async with (
        service,
        GroupCommitter(pool=pool, config=outbox, on_commit=service.wake) as committer,
    ):
        await committer.submit([dial(f"10.{i}") for i in range(3)])
        await _until(lambda: _settled(db))
    states = [r["state"] for r in await _rows(db)]
    assert states.count("delivered") == 1
    assert states.count("expired") == 2
    assert len(crm.state()["accounts"]["test"]["events"]) == 1


async def test_rows_waiting_for_the_keys_turn_past_the_lease_are_handed_back_not_sent_late(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """The wait for the key's turn counts against the lease: rows whose turn comes after it
    are handed back unsent, so the instance that takes them over is the only one to send them."""
    await add_enterprise(db, crm.url, crm.api_key)
    pacing = PacingConfig(telephony_rps=1.0)  # per instance: each waits ~2 s between requests
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2, pacing=pacing)
    outbox = OutboxConfig(lease_seconds=1.0, retry=BackoffPolicy(base=0.05, cap=0.2))
    one, two = (
        DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)
        for _ in range(2)
    )
    async with one, two, GroupCommitter(pool=pool, on_commit=one.wake) as committer:
        await committer.submit([dial(f"11.{i}") for i in range(4)])
        await _until(lambda: _settled(db), timeout=40)
    assert [r["state"] for r in await _rows(db)] == ["delivered"] * 4
    sent = [e["event"]["callExternalId"] for e in crm.state()["accounts"]["test"]["events"]]
    assert sorted(sent) == [f"11.{i}" for i in range(4)]


async def test_a_request_outlasting_the_lease_keeps_its_rows_by_extending_the_lease(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """A request started in time may take longer than the lease: the lease is extended while
    it is in flight, so another instance never takes the row and sends it a second time."""
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(endpoint="telephony/call/event", mode="latency", latency_ms=1500)
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2)
    outbox = OutboxConfig(lease_seconds=1.0, retry=BackoffPolicy(base=0.05, cap=0.2))
    one, two = (
        DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)
        for _ in range(2)
    )
    async with one, two, GroupCommitter(pool=pool, on_commit=one.wake) as committer:
        await committer.submit([dial("12.1")])
        await _until(lambda: _settled(db))
        await asyncio.sleep(2.0)  # had the lease lapsed, the other instance's copy lands now
    (row,) = await _rows(db)
    assert (row["state"], row["attempts"]) == ("delivered", 1)
    sent = [e["event"]["callExternalId"] for e in crm.state()["accounts"]["test"]["events"]]
    assert sent == ["12.1"]


async def test_rows_committed_by_another_instance_are_claimed_when_they_commit(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer, database_url: str
) -> None:
    """The committer here wakes nobody in-process (another instance's intake): the commit's
    NOTIFY does, long before the next poll."""
    await add_enterprise(db, crm.url, crm.api_key)
    config = DeliveryConfig(poll_interval=600.0, sweep_interval=0.2)
    service = DeliveryService(
        pool=pool, configs=Configs(pool), config=config, listen_dsn=database_url
    )
    async with service, GroupCommitter(pool=pool) as committer:
        assert service._listener is not None
        await asyncio.wait_for(service._listener.wait_listening(), 15.0)
        await asyncio.sleep(0.3)  # the loop's first claim is done: it now idles for the poll
        await committer.submit([dial("8.1"), dial("8.2")])
        await _until(lambda: _settled(db), timeout=60.0)
    assert [r["state"] for r in await _rows(db)] == ["delivered"] * 2


async def _claims_for(service: DeliveryService, db: asyncpg.Connection, submit: Any) -> int:
    """Claim statements from ``submit()`` until its rows are settled and the loop is idle."""
    assert service._listener is not None
    await asyncio.wait_for(service._listener.wait_listening(), 15.0)
    await asyncio.sleep(0.3)  # the start-up claim is done: the loop idles (poll_interval 600 s)
    before = service.claims
    await submit()
    await _until(lambda: _settled(db), timeout=60.0)
    await asyncio.sleep(0.3)  # the wake-up of the last enterprise task to finish
    return service.claims - before


async def test_a_claim_that_came_back_short_is_not_followed_by_an_empty_one(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer, database_url: str
) -> None:
    """One event: the commit's wake-up claims it, the enterprise's task wakes the loop when it
    ends (rows of the same call may be due then), and that is all: no empty claim right after
    a short one (it was half the claims under steady load)."""
    await add_enterprise(db, crm.url, crm.api_key)
    config = DeliveryConfig(poll_interval=600.0, sweep_interval=0.2, claim_gap=0.0)
    service = DeliveryService(
        pool=pool, configs=Configs(pool), config=config, listen_dsn=database_url
    )
    async with service, GroupCommitter(pool=pool) as committer:
        claims = await _claims_for(service, db, lambda: committer.submit([dial("9.1")]))
    assert claims == 2
    assert service.stats()["claim_statements"] == service.claims


async def test_an_idle_loop_wakes_at_the_history_tick_without_waiting_for_a_poll(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """The hangup's popup goes at once; its history comes due at the next 0.5 s tick, and the
    loop, with nothing else to wake it and a poll of ten minutes, claims it then."""
    await add_enterprise(db, crm.url, crm.api_key)
    config = DeliveryConfig(poll_interval=600.0, sweep_interval=0.2)
    service = DeliveryService(
        pool=pool, configs=Configs(pool), config=config, outbox=OutboxConfig(history_gather=0.5)
    )
    date = "2025-11-26 10:00:00"
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([dial("9.5")])
        await committer.submit([_hangup("9.5", date, origin="live")])
        # Within seconds: the tick (<= 0.5 s away), not the 600 s poll.
        await _until(lambda: _settled(db), timeout=5.0)
    account = crm.state()["accounts"]["test"]
    assert [e["event"]["type"] for e in account["events"]] == ["in", "hangup"]
    assert [c["externalId"] for c in account["calls"]] == ["9.5"]


async def test_wake_ups_within_the_claim_gap_share_one_claim(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer, database_url: str
) -> None:
    """Five commits in quick succession, each waking the loop: the first is claimed at once,
    the other four wait out the gap and go in one claim (then the empty one after the last
    task), instead of a claim per wake-up."""
    await add_enterprise(db, crm.url, crm.api_key)
    config = DeliveryConfig(poll_interval=600.0, sweep_interval=0.2, claim_gap=0.5)
    service = DeliveryService(
        pool=pool, configs=Configs(pool), config=config, listen_dsn=database_url
    )

    async def five_commits() -> None:
        for i in range(5):
            await committer.submit([dial(f"9.{10 + i}")])

    async with service, GroupCommitter(pool=pool) as committer:
        claims = await _claims_for(service, db, five_commits)
    assert claims <= 3
    assert [r["state"] for r in await _rows(db)] == ["delivered"] * 5


DATE = "2026-11-26 10:00:00"


async def test_rows_backed_off_in_an_outage_go_out_once_retailcrm_answers_again(
    pool: asyncpg.Pool, db: asyncpg.Connection, crm: SandboxServer
) -> None:
    """Rows that failed wait out their backoff (here 60 s); the first request RetailCRM answers
    again (a later call's) makes them due at once, instead of a minute after the outage."""
    await add_enterprise(db, crm.url, crm.api_key)
    crm.add_fault(endpoint="telephony/*", mode="error", status=500)
    config = DeliveryConfig(poll_interval=0.05, sweep_interval=0.2)
    outbox = OutboxConfig(retry=BackoffPolicy(base=60.0, cap=60.0))
    service = DeliveryService(pool=pool, configs=Configs(pool), config=config, outbox=outbox)
    async with service, GroupCommitter(pool=pool, on_commit=service.wake) as committer:
        await committer.submit([_hangup("7.1", DATE), _hangup("7.2", DATE)])

        async def backed_off() -> bool:
            rows = await _rows(db)
            return all(r["attempts"] == 1 and r["lease_owner"] is None for r in rows)

        await _until(backed_off)
        assert service.expedited == 0
        crm.clear_faults()
        await committer.submit([_hangup("7.3", DATE)])
        await _until(lambda: _settled(db), timeout=20.0)
        assert service.expedited == 2
    assert [r["state"] for r in await _rows(db)] == ["delivered"] * 3
