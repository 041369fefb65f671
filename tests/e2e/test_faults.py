"""Fault tests of the durable pipeline, each with real processes (service, sandbox, PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from retailcrm_service.storage.database import migrate
from tests.support.pg import EmbeddedPostgres
from tests.support.pipeline import (  # noqa: F401  (api_key, crm, enterprise: pytest fixtures)
    ACCOUNT,
    FAST_ENV,
    add_enterprise,
    api_key_fixture,
    crm_fixture,
    enterprise_fixture,
    post_events,
    prepare_sandbox,
    run_async,
    sandbox_state,
    wait_drained,
)
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow


def call_events(n: int, *, prefix: str = "17641", live: bool = True) -> list[dict[str, Any]]:
    """``n`` answered incoming calls: dial + hangup each (or recovered hangups only)."""
    events: list[dict[str, Any]] = []
    for i in range(n):
        uid = f"{prefix}{i:05d}.{i}"
        common = {"UniqueId": uid, "Phone": "+375291234567", "Extensions": ["150"], "CallType": 0}
        hangup = {
            **common,
            "DateReceived": "2025-11-26 10:00:00",
            "StartTime": "2025-11-26 10:00:03",
            "EndTime": "2025-11-26 10:01:00",
            "CallStatus": "2",
        }
        base = {"enterprise_number": "0367", "call_unique_id": uid}
        if live:
            events.append({**base, "event_type": "dial", "payload": common})
            events.append({**base, "event_type": "hangup", "payload": hangup})
        else:
            events.append({**base, "event_type": "hangup", "payload": hangup, "origin": "download"})
    return events


def _stats(service: ServiceProcess) -> dict[str, Any]:
    return httpx.get(service.url + "/stats", timeout=5).json()["outbox"]  # type: ignore[no-any-return]


def uploaded(crm: ServiceProcess) -> list[dict[str, Any]]:
    return sandbox_state(crm)["accounts"][ACCOUNT]["calls"]  # type: ignore[no-any-return]


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_kill_9_while_delivering_then_restart_delivers_everything_once(
    database_url: str, crm: ServiceProcess, enterprise: str
) -> None:
    """(a) every accepted event is delivered after a kill -9 and a restart; no call stored twice."""
    httpx.post(
        crm.url + "/_sandbox/faults",
        json={"endpoint": "telephony/calls/upload", "mode": "latency", "latency_ms": 400},
        timeout=5,
    ).raise_for_status()
    events = call_events(150, live=False)
    service = ServiceProcess.service(database_url, env=FAST_ENV)
    try:
        service.start()
        post_events(service, events, batch=50)
        wait_for(lambda: len(uploaded(crm)) >= 50)
        service.kill()
        assert len(uploaded(crm)) < 150, "delivery finished before the kill"
        service.start()
        states = asyncio.run(wait_drained(database_url, timeout=60))
    finally:
        service.stop()
    assert states == {"delivered": 150}
    calls = uploaded(crm)
    assert sorted(c["externalId"] for c in calls) == sorted(e["call_unique_id"] for e in events)
    # at most the batch in flight at the kill was re-sent, and RetailCRM's dedup absorbed it
    assert sum(c["duplicates"] for c in calls) <= 50


def test_two_instances_on_one_database_deliver_every_event_once(
    database_url: str, crm: ServiceProcess, enterprise: str
) -> None:
    """(d) SKIP LOCKED and leases: each popup sent once, each call uploaded once."""
    events = call_events(40)
    one = ServiceProcess.service(database_url, env=FAST_ENV)
    two = ServiceProcess.service(database_url, env=FAST_ENV)
    try:
        one.start()
        two.start()
        # each sees the other (heartbeats in PostgreSQL) and paces at half of the key's budget
        for proc in (one, two):
            wait_for(lambda p=proc: _stats(p)["instances"] == 2)
        post_events(one, events[:40], batch=10)
        post_events(two, events[40:], batch=10)
        states = asyncio.run(wait_drained(database_url, timeout=60))
    finally:
        one.stop()
        two.stop()
    # Both instances pace at half the key's budget, so a dial may wait past a second with its
    # hangup already queued: then it is superseded (pointless: the call is over), never sent late,
    # and its call's hangup event is not sent either (no card opened to close).
    superseded = states.pop("superseded", 0)
    assert states == {"delivered": 80 - superseded}
    assert superseded <= 40
    account = sandbox_state(crm)["accounts"][ACCOUNT]
    assert len(account["calls"]) == 40
    assert all(c["duplicates"] == 0 for c in account["calls"])
    sent = [(e["event"]["callExternalId"], e["event"]["type"]) for e in account["events"]]
    assert len(sent) == len(set(sent)) == 80 - 2 * superseded
    shown = {uid for uid, kind in sent if kind == "in"}
    assert {uid for uid, kind in sent if kind == "hangup"} == shown
    assert len(shown) == 40 - superseded
    assert sandbox_state(crm)["rateLimitRejections"]["count"] == 0


def test_postgres_restart_during_ingest_loses_nothing(
    private_postgres: EmbeddedPostgres, crm: ServiceProcess, api_key: str
) -> None:
    """(b) errors only for uncommitted events; their retries succeed; everything is delivered."""
    dsn = private_postgres.admin_dsn

    asyncio.run(migrate(dsn))
    run_async(add_enterprise, dsn, crm.url, api_key)
    events = call_events(400, live=False)
    batches = [events[i : i + 20] for i in range(0, len(events), 20)]
    first_accepts: list[int] = []
    errors: list[str] = []
    service = ServiceProcess.service(dsn, env=FAST_ENV)

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            for batch in batches:
                while True:
                    try:
                        response = http.post(service.url + "/api/events", json={"events": batch})
                    except httpx.HTTPError as exc:
                        errors.append(type(exc).__name__)
                        time.sleep(0.2)
                        continue
                    if response.status_code == 202:
                        first_accepts.append(response.json()["accepted"])
                        break
                    assert response.status_code == 503, response.text
                    errors.append(response.json()["error"]["code"])
                    time.sleep(0.2)
                time.sleep(0.02)

    try:
        service.start()
        sender = threading.Thread(target=client)
        sender.start()
        wait_for(lambda: len(first_accepts) >= 5)
        private_postgres.restart()
        sender.join(timeout=60)
        assert not sender.is_alive(), f"{errors[-5:]} {len(first_accepts)}\n{service.log()}"
        states = asyncio.run(wait_drained(dsn, timeout=60))
    finally:
        service.stop()
    assert errors, "the restart did not hit ingest"
    # a request that failed stored nothing: its retry was accepted whole, never as a duplicate
    assert first_accepts == [20] * len(batches)
    assert states == {"delivered": 400}
    assert len(uploaded(crm)) == 400


def test_sandbox_down_for_60s_history_delivered_after_stale_popups_expired(
    database_url: str, crm: ServiceProcess, enterprise: str
) -> None:
    """(c) history survives the outage; stale dial popups are expired or superseded and
    counted, and no hangup closes a card that never opened."""
    httpx.post(
        crm.url + "/_sandbox/faults", json={"endpoint": "telephony/*", "mode": "down"}, timeout=5
    ).raise_for_status()
    service = ServiceProcess.service(database_url, env=FAST_ENV)
    try:
        service.start()
        post_events(service, call_events(20), batch=10)
        time.sleep(60)
        httpx.delete(crm.url + "/_sandbox/faults", timeout=5).raise_for_status()
        states = asyncio.run(wait_drained(database_url, timeout=60))
        stats = httpx.get(service.url + "/stats", timeout=5).json()["outbox"]
    finally:
        service.stop()
    account = sandbox_state(crm)["accounts"][ACCOUNT]
    assert len(account["calls"]) == 20
    assert account["events"] == []
    # every dial popup went stale: expired, or superseded once its failed retry met the hangup
    assert states["delivered"] == 20
    assert states.get("expired", 0) + states.get("superseded", 0) == 20
    # no hangup popup was sent (no card had opened: skipped, or expired if still waiting at
    # its TTL), and their rows went on to deliver the history
    counters = stats["enterprises"]["0367"]
    assert counters["expired"] + counters["superseded"] + counters["skipped"] == 40
    assert counters["skipped"] <= 20
    assert counters["calls_uploaded"] == 20
