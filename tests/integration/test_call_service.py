"""The reference call service on a real socket, the real matrix on PostgreSQL, a real receiver."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from adapters.call_service import CallServiceSettings, create_app
from tests.integration._servers import RecordingReceiver
from tests.support.pg import create_enterprise
from tests.support.pipeline import fixture_records
from tests.support.procs import ThreadedServer

TOKEN = "375291110001"  # name2 of enterprise 0367, as in the fixtures
SECRET = "0123456789abcdef0123456789abcdef"

EXPECTED_KEYS = [
    "0367:1764150000.101:dial:150,151",
    "0367:1764150000.101:dial:150,151,152",
    "0367:1764150000.101:bridge",
    "0367:1764150000.101:hangup",
    "0367:1764150100.205:dial:150",
    "0367:1764150100.205:hangup",
    "0367:1764150200.310:dial:151",
    "0367:1764150200.310:bridge",
    "0367:1764150200.310:hangup",
    "0367:1764150400.512:dial:",
    "0367:1764150400.512:hangup",
    "0367:1764140000.77:hangup",
]


async def _seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await create_enterprise(
            conn, "0367", name2=TOKEN, secret=SECRET, integrations={"retailcrm": True}
        )
        await create_enterprise(conn, "0400", name2="375291110002", integrations={"uon": True})
    finally:
        await conn.close()


@pytest.fixture
def receiver() -> Iterator[tuple[RecordingReceiver, ThreadedServer]]:
    recorder = RecordingReceiver()
    with ThreadedServer(recorder, lifespan="off") as server:
        yield recorder, server


@pytest.fixture
def call_service(
    database_url: str, receiver: tuple[RecordingReceiver, ThreadedServer]
) -> Iterator[httpx.Client]:
    asyncio.run(_seed(database_url))
    settings = CallServiceSettings(
        dsn=database_url, targets={"retailcrm": f"{receiver[1].url}/api/events"}
    )
    with (
        ThreadedServer(create_app(settings), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        yield client


def test_every_fixture_call_arrives_with_the_expected_events_and_keys(
    call_service: httpx.Client, receiver: tuple[RecordingReceiver, ThreadedServer]
) -> None:
    recorder = receiver[0]
    for i, line in enumerate(fixture_records()):
        body = dict(line["body"])
        # Half the requests carry the Token in the header only, the other half in the body only.
        headers = {"Token": body.pop("Token")} if i % 2 else {}
        if not headers:
            body["Token"] = TOKEN
        reply = call_service.post(f"/{line['event']}", json=body, headers=headers)
        assert reply.status_code == 200, reply.text
    assert recorder.wait_for(lambda r: len(r.events) >= len(EXPECTED_KEYS), timeout=10)
    events = recorder.events
    assert sorted(recorder.keys) == sorted(EXPECTED_KEYS)
    by_key = {e["idempotency_key"]: e for e in events}
    recovered = by_key["0367:1764140000.77:hangup"]
    assert (recovered["event_type"], recovered["origin"]) == ("hangup", "download")
    assert by_key["0367:1764150400.512:dial:"]["payload"]["Phone"] == ""
    assert by_key["0367:1764150100.205:dial:150"]["payload"]["CallType"] == 0
    assert all("Token" not in e["payload"] for e in events)
    assert all(e["enterprise_number"] == "0367" for e in events)
    # Within a call, events arrive in the order the host sent them.
    order = [e["idempotency_key"] for e in events if e["call_unique_id"] == "1764150000.101"]
    assert order == EXPECTED_KEYS[:4]


def test_internal_calls_and_crm_originated_legs_are_not_sent(
    call_service: httpx.Client, receiver: tuple[RecordingReceiver, ThreadedServer]
) -> None:
    recorder = receiver[0]
    skipped = [line for line in fixture_records() if line["body"].get("CallType") == 2]
    assert len(skipped) == 3
    for line in skipped:
        reply = call_service.post(f"/{line['event']}", json=line["body"])
        assert reply.status_code == 200
        assert reply.json()["status"] == "skipped"
    call_service.post("/hangup", json=fixture_records()[4]["body"])  # a marker that does go through
    assert recorder.wait_for(lambda r: len(r.events) >= 1, timeout=10)
    assert recorder.keys == ["0367:1764150000.101:hangup"]
    stats = call_service.get("/stats").json()
    assert stats["webhooks"]["skipped"] == {"internal": 2, "crm_originated": 1}


def test_the_token_may_be_the_secret_or_the_number(
    call_service: httpx.Client, receiver: tuple[RecordingReceiver, ThreadedServer]
) -> None:
    body = dict(fixture_records()[4]["body"])
    del body["Token"]
    for token in (SECRET, "0367"):
        assert call_service.post("/hangup", json=body, headers={"Token": token}).status_code == 200
    assert receiver[0].wait_for(lambda r: len(r.events) >= 2, timeout=10)


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"UniqueId": "1.1"}', {"Token": "no-such-token"}, 403, "unknown_token"),
        (b'{"UniqueId": "1.1"}', {}, 401, "missing_token"),
        (b'{"UniqueId": "1.1", "Token": ', {"Token": TOKEN}, 400, "invalid_json"),
        (b'["UniqueId"]', {"Token": TOKEN}, 400, "invalid_json"),
        (b'{"CallType": 0}', {"Token": TOKEN}, 422, "invalid_event"),
        (b'{"UniqueId": "1.1", "CallType": "9"}', {"Token": TOKEN}, 422, "invalid_event"),
        (
            b'{"UniqueId": "1.1", "Pad": "' + b"x" * 70_000 + b'"}',
            {"Token": TOKEN},
            413,
            "too_large",
        ),
    ],
)
def test_bad_webhooks_get_a_clear_4xx_and_send_nothing(
    call_service: httpx.Client,
    receiver: tuple[RecordingReceiver, ThreadedServer],
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    reply = call_service.post("/dial", content=content, headers=headers)
    assert reply.status_code == status
    assert reply.json()["error"]["code"] == code
    assert reply.json()["error"]["message"]
    stats = call_service.get("/stats").json()
    assert stats["emitted"] == 0
    assert receiver[0].events == []


def test_a_streamed_body_past_the_limit_gets_413_without_a_length(
    call_service: httpx.Client, receiver: tuple[RecordingReceiver, ThreadedServer]
) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to refuse it by
        yield b'{"UniqueId": "1.1", "Pad": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    reply = call_service.post("/dial", content=chunks(), headers={"Token": TOKEN})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "too_large"
    assert call_service.get("/stats").json()["webhooks"]["errors"] == {"too_large": 1}
    assert receiver[0].events == []


def test_webhooks_return_the_request_id_and_refuse_other_methods(
    call_service: httpx.Client,
) -> None:
    body = dict(fixture_records()[4]["body"])
    given = call_service.post("/hangup", json=body, headers={"X-Request-ID": "host-7.1"})
    assert given.status_code == 200
    assert given.headers["x-request-id"] == "host-7.1"
    assert given.headers["content-type"] == "application/json"
    assert given.json() == {"status": "queued"}
    hostile = call_service.post("/hangup", json=body, headers={"X-Request-ID": "a b\tc"})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])
    assert call_service.get("/dial").status_code == 405
    assert call_service.put("/hangup", json=body).status_code == 405
    assert call_service.post("/nothing", json=body).status_code == 404


def test_a_failure_inside_a_webhook_is_a_json_500_and_the_next_one_is_served(
    database_url: str,
    receiver: tuple[RecordingReceiver, ThreadedServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    asyncio.run(_seed(database_url))
    settings = CallServiceSettings(
        dsn=database_url, targets={"retailcrm": f"{receiver[1].url}/api/events"}
    )
    app = create_app(settings)
    hooks = app.hooks  # type: ignore[attr-defined]
    translate = hooks.translate

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug in the translation")

    body = dict(fixture_records()[4]["body"])
    with (
        ThreadedServer(app, lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        hooks.translate = broken
        failed = client.post("/hangup", json=body, headers={"X-Request-ID": "r-500"})
        hooks.translate = translate
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "internal"
        assert failed.headers["x-request-id"] == "r-500"
        assert client.post("/hangup", json=body).status_code == 200
        assert receiver[0].wait_for(lambda r: len(r.events) >= 1, timeout=10)
    assert "call_service.webhook_failed event=hangup" in caplog.text
    assert receiver[0].keys == ["0367:1764150000.101:hangup"]


def test_health_and_stats_describe_the_client(call_service: httpx.Client) -> None:
    health = call_service.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["targets"]["retailcrm"]["breaker"] == "closed"
    stats = call_service.get("/stats").json()
    assert stats["state"] == "open"
    assert set(stats["targets"]) == {"retailcrm"}
    assert stats["matrix"]["state"] == "open"
    assert "webhooks" in stats


def test_an_enterprise_added_and_then_disabled_while_running_is_followed(
    call_service: httpx.Client,
    receiver: tuple[RecordingReceiver, ThreadedServer],
    database_url: str,
) -> None:
    """A new token resolves on first use (a miss loads it); disabling by plain SQL stops routing."""

    async def add() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await create_enterprise(
                conn, "0500", name2="375291110005", integrations={"retailcrm": True}
            )
        finally:
            await conn.close()

    async def disable() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                """UPDATE enterprises SET integrations_config = jsonb_set(
                       integrations_config, '{retailcrm,enabled}', 'false')
                   WHERE number = '0500'"""
            )
        finally:
            await conn.close()

    recorder = receiver[0]
    asyncio.run(add())
    hangup = dict(fixture_records()[4]["body"], Token="375291110005")
    assert call_service.post("/hangup", json=hangup).status_code == 200
    assert recorder.wait_for(lambda r: len(r.events) == 1, timeout=10)
    assert recorder.events[0]["enterprise_number"] == "0500"

    def invalidations() -> int:
        return int(call_service.get("/stats").json()["matrix"]["matrix"]["invalidations"])

    before = invalidations()
    asyncio.run(disable())
    deadline = time.monotonic() + 5
    while invalidations() == before and time.monotonic() < deadline:
        time.sleep(0.05)  # the NOTIFY invalidates the snapshot within moments
    assert invalidations() > before
    time.sleep(0.2)  # the background revalidation of the entry
    later = dict(hangup, UniqueId="1764150000.999")
    assert call_service.post("/hangup", json=later).status_code == 200
    time.sleep(0.5)
    assert [e["call_unique_id"] for e in recorder.events] == ["1764150000.101"]
    assert call_service.get("/stats").json()["no_target"] >= 1
