"""POST /api/events and /api/events/replay on the real app, a real PostgreSQL and the sandbox."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retailcrm_service.app import create_app
from retailcrm_service.sandbox import SandboxServer
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings
from tests.support.pipeline import (
    USER_EXTENSIONS,
    add_enterprise,
    expected_calls,
    fixture_events,
    prepare_sandbox,
    wait_drained,
)
from tests.support.procs import InProcessService


@pytest.fixture
def crm() -> Iterator[SandboxServer]:
    with SandboxServer(rate_limit=True, demo_data=False) as server:
        prepare_sandbox(server.url, server.api_key)
        yield server


@pytest.fixture
def service(
    database_url: str, crm: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcessService]:
    async def setup() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await add_enterprise(conn, crm.url, crm.api_key)
        finally:
            await conn.close()

    asyncio.run(setup())
    monkeypatch.setenv("RETAILCRM_DELIVERY_POLL_INTERVAL", "0.1")
    config = Settings(
        database_url=Secret(database_url),
        jwt_secret=Secret("integration-jwt-secret-0123456789"),
        allow_http=True,
        data_dir=tmp_path,
    )
    with InProcessService(create_app(config)) as svc:
        yield svc


def _account(crm: SandboxServer) -> dict[str, Any]:
    return crm.state()["accounts"]["test"]  # type: ignore[no-any-return]


def _post(service: InProcessService, body: Any, **kwargs: Any) -> httpx.Response:
    if "content" not in kwargs:
        kwargs["json"] = body
    return httpx.post(service.url + "/api/events", timeout=10, **kwargs)


async def _count(database_url: str, sql: str = "SELECT count(*) FROM retailcrm_outbox") -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _journal(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM integration_logs")
        return repr([dict(r) for r in rows])
    finally:
        await conn.close()


@pytest.mark.slow
def test_every_fixture_call_reaches_the_sandbox_exactly(
    service: InProcessService, crm: SandboxServer, database_url: str
) -> None:
    events = fixture_events()
    # sent as the call service does: small batches, in order
    for start in range(0, len(events), 4):
        response = _post(service, {"events": events[start : start + 4]})
        assert response.status_code == 202
    states = asyncio.run(wait_drained(database_url))
    assert "pending" not in states
    assert "dead" not in states
    account = _account(crm)
    calls = {c["externalId"]: c for c in account["calls"]}
    for external_id, fields in expected_calls().items():
        assert {k: calls[external_id].get(k) for k in fields} == fields, external_id
    # the internal call, the CRM's own leg and the call without a number are absent
    assert set(calls) == set(expected_calls())
    assert all(c["duplicates"] == 0 for c in account["calls"])
    popups = account["popups"]
    # the later dial with a new extension reached the new manager; every popup was closed
    ring_group = {p["userId"] for p in popups if p["callExternalId"] == "1764150000.101"}
    assert ring_group == {19, 20, 21}
    assert account["openPopups"] == {}
    assert all(p["state"] in ("closed", "superseded") for p in popups)
    # the recovered hangup produced history without any popup
    assert not [p for p in popups if p["callExternalId"] == "1764140000.77"]
    assert crm.state()["rateLimitRejections"]["count"] == 0
    # every attempt is traced with its call id, and the API key is in no journal row (the
    # journal stores its rows in batches, up to a linger after the deliveries themselves)
    deadline = time.monotonic() + 10.0
    while True:
        logged = asyncio.run(
            _count(
                database_url,
                "SELECT count(DISTINCT call_unique_id) FROM integration_logs"
                " WHERE integration_type = 'retailcrm' AND call_unique_id IS NOT NULL",
            )
        )
        if logged >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert logged == 4
    journal = asyncio.run(_journal(database_url))
    assert journal
    assert crm.api_key not in journal
    stats = httpx.get(service.url + "/stats", timeout=5).json()["outbox"]
    assert stats["enterprises"]["0367"]["calls_uploaded"] == 4
    metrics = httpx.get(service.url + "/metrics", timeout=5).text
    assert (
        'retailcrm_service_delivery_outcomes_total{kind="history",outcome="delivered"} 4.0'
        in metrics
    )
    assert 'retailcrm_service_delivery_latency_seconds_count{kind="history"} 4.0' in metrics


def test_duplicates_are_reported_and_bad_events_rejected_alone(
    service: InProcessService, database_url: str
) -> None:
    events = fixture_events()[:2]
    bad = [{"event_type": "dial"}, {"enterprise_number": "0367", "event_type": "ring"}, 7]
    response = _post(service, {"events": [events[0], *bad, events[1], events[0]]})
    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (2, 1)
    assert [r["index"] for r in body["rejected"]] == [1, 2, 3]
    assert "enterprise_number" in body["rejected"][0]["error"]
    again = _post(service, events[0]).json()
    assert again == {"accepted": 0, "duplicates": 1, "rejected": []}
    assert asyncio.run(_count(database_url)) == 2


def test_unparseable_and_oversized_bodies_get_the_error_envelope(
    service: InProcessService, database_url: str
) -> None:
    garbage = _post(
        service, None, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 400
    assert garbage.json()["error"]["code"] == "invalid_json"
    big = json.dumps({"events": [{"payload": {"x": "y" * 1024}}] * 1100}).encode()
    assert _post(service, None, content=big).status_code == 413
    many = {"events": [fixture_events()[0]] * 1001}
    too_many = _post(service, many)
    assert too_many.status_code == 413
    assert too_many.json()["error"]["code"] == "too_large"
    assert _post(service, [1, 2]).status_code == 400
    assert asyncio.run(_count(database_url)) == 0


def test_intake_carries_the_request_id_and_is_counted_like_any_route(
    service: InProcessService,
) -> None:
    """POST /api/events is answered ahead of the middleware stack; what the stack gives every
    other route still holds: the request id, the error envelope, the route's metrics."""
    ok = _post(service, fixture_events()[0], headers={"X-Request-ID": "batch-1"})
    assert ok.status_code == 202
    assert ok.headers["x-request-id"] == "batch-1"
    bad = _post(service, None, content=b"[", headers={"X-Request-ID": "x y\tlevel=error"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    assert bad.headers["x-request-id"] not in ("", "x y\tlevel=error")
    wrong_method = httpx.get(service.url + "/api/events", timeout=10)
    assert wrong_method.status_code == 405
    assert "x-request-id" in wrong_method.headers
    metrics = httpx.get(service.url + "/metrics", timeout=10).text
    for status in ("202", "400"):
        line = next(
            m
            for m in metrics.splitlines()
            if m.startswith("retailcrm_service_http_requests_total{")
            and 'route="/api/events"' in m
            and f'status="{status}"' in m
        )
        assert line.endswith(" 1.0"), line


def test_a_caller_gone_mid_body_is_counted_not_logged_as_a_failure(
    service: InProcessService, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"events": ['
        )
    metrics = ""
    deadline = time.monotonic() + 10
    while 'status="499"' not in metrics:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
        metrics = httpx.get(service.url + "/metrics", timeout=10).text
    assert not [r for r in caplog.records if r.getMessage().startswith("events.failed")]
    assert _post(service, fixture_events()[0]).status_code == 202


def test_health_shows_the_backlog_and_replay_redelivers(
    service: InProcessService, crm: SandboxServer, database_url: str
) -> None:
    recovered = fixture_events()[-1]
    assert _post(service, recovered).json()["accepted"] == 1
    asyncio.run(wait_drained(database_url))
    health = httpx.get(service.url + "/health", timeout=5).json()
    assert health["outbox"]["pending"] == 0
    response = httpx.post(
        service.url + "/api/events/replay",
        json={"enterprise_number": "0367", "states": ["delivered"]},
        timeout=5,
    )
    assert response.json() == {"replayed": 1, "leased": 0}
    asyncio.run(wait_drained(database_url))
    (call,) = _account(crm)["calls"]
    # re-delivery is safe: RetailCRM dedups by externalId
    assert call["duplicates"] == 1
    bad = httpx.post(service.url + "/api/events/replay", json={"since": "yesterday"}, timeout=5)
    assert bad.status_code == 422
    assert set(bad.json()["error"]["fields"]) == {"enterprise_number", "since"}


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_event = st.fixed_dictionaries(
    {},
    optional={
        "enterprise_number": st.sampled_from(["0367", "9999", "", "x" * 40]) | _json,
        "event_type": st.sampled_from(["dial", "bridge", "hangup", "download", "ring"]) | _json,
        "call_unique_id": st.sampled_from(["1.1", "", " "]) | _json,
        "payload": st.fixed_dictionaries(
            {}, optional={"UniqueId": st.sampled_from(["2.2", ""]), "Extensions": _json}
        )
        | _json,
        "occurred_at": st.sampled_from(["2025-11-26T10:00:00+03:00", "2025-11-26", "x"]) | _json,
        "origin": st.sampled_from(["live", "download", "other"]) | _json,
    },
)
_body = st.one_of(
    _event,
    st.fixed_dictionaries({"events": st.lists(_event | _json, max_size=6)}),
    st.fixed_dictionaries({"events": _json}),
    _json,
)


@pytest.mark.slow
def test_hostile_bodies_never_500_and_never_write_partially(
    service: InProcessService, database_url: str
) -> None:
    client = httpx.Client(base_url=service.url, timeout=10)

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=_body, raw=st.binary(max_size=64) | st.none())
    def check(body: Any, raw: bytes | None) -> None:
        before = asyncio.run(_count(database_url))
        if raw is not None:
            response = client.post("/api/events", content=raw)
        else:
            response = client.post("/api/events", json=body)
        after = asyncio.run(_count(database_url))
        assert response.status_code in (202, 400, 413, 422), response.text
        if response.status_code == 202:
            assert after - before == response.json()["accepted"]
        else:
            assert "error" in response.json()
            assert after == before

    try:
        check()
    finally:
        client.close()


def test_bodies_postgresql_would_refuse_never_sink_a_transaction(
    service: InProcessService, database_url: str
) -> None:
    good = json.dumps(fixture_events()[0])
    nul = (
        '{"enterprise_number":"0367","event_type":"bridge",'
        '"payload":{"UniqueId":"9.9","n":"\\u0000"}}'
    )
    surrogate = nul.replace("\\u0000", "\\ud800")
    body = f'{{"events":[{good},{nul},{surrogate}]}}'.encode()
    response = _post(service, None, content=body)
    assert response.status_code == 202
    assert response.json()["accepted"] == 1
    assert [r["index"] for r in response.json()["rejected"]] == [1, 2]
    for raw in (b'{"events":[{"x":NaN}]}', b"[" * 100_000 + b"]" * 100_000):
        bad = _post(service, None, content=raw)
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_json"
    assert asyncio.run(_count(database_url)) == 1


def test_call_history_dates_follow_the_accounts_timezone_when_configured(
    service: InProcessService, crm: SandboxServer, database_url: str
) -> None:
    """Host times are Minsk local; an account kept in Yekaterinburg (UTC+5) sees them +2 h."""
    put = httpx.put(
        f"{service.url}/api/config/0367",
        json={
            "domain": crm.url,
            "enabled": True,
            "user_extensions": USER_EXTENSIONS,
            "account_timezone": "Asia/Yekaterinburg",
        },
        timeout=10,
    )
    assert put.status_code == 200, put.text
    assert httpx.get(f"{service.url}/api/config/0367").json()["account_timezone"] == (
        "Asia/Yekaterinburg"
    )
    refused = httpx.put(
        f"{service.url}/api/config/0367",
        json={"domain": crm.url, "account_timezone": "Mars/Olympus"},
        timeout=10,
    )
    assert refused.status_code == 422
    assert httpx.get(f"{service.url}/api/config/0367").json()["account_timezone"] == (
        "Asia/Yekaterinburg"
    )

    hangup = {
        "enterprise_number": "0367",
        "event_type": "hangup",
        "origin": "download",
        "payload": {
            "UniqueId": "1764140000.88",
            "Phone": "+375291234568",
            "Extensions": ["150"],
            "CallType": 0,
            "DateReceived": "2025-11-26 07:13:20",
            "StartTime": "2025-11-26 07:13:25",
            "EndTime": "2025-11-26 07:15:00",
            "CallStatus": "2",
        },
    }
    assert _post(service, hangup).json()["accepted"] == 1
    asyncio.run(wait_drained(database_url))
    (call,) = [c for c in _account(crm)["calls"] if c["externalId"] == "1764140000.88"]
    assert call["date"] == "2025-11-26 09:13:20"  # DateReceived (the CDR start), +2 h
