"""POST /api/events rejects, per event, values PostgreSQL cannot store.

A payload holding a NUL character (text/jsonb refuse NUL) or a lone surrogate, an occurred_at
whose UTC offset PostgreSQL refuses or whose instant falls outside the calendar, and a dial whose
Extensions make an idempotency key too long to index are rejected alone; the good events of the
same request, and of the requests committed with it, are stored, so a retrying client never
resends a poison event forever.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.pg import create_enterprise
from tests.support.service import running_service, service_settings

CONFIG = {"enabled": True, "domain": "http://127.0.0.1:9", "api_key": "k" * 20}


def _event(unique_id: str, **payload: Any) -> dict[str, Any]:
    return {
        "enterprise_number": "0367",
        "event_type": "hangup",
        "call_unique_id": unique_id,
        "payload": {"Phone": "+375291234567", **payload},
    }


async def _post(database_url: str, body: bytes) -> httpx.Response:
    parts = {"events"}
    async with (
        running_service(service_settings(database_url), parts=parts) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=20) as http,
    ):
        return await http.post(
            "/api/events", content=body, headers={"content-type": "application/json"}
        )


async def test_a_lone_surrogate_in_one_event_rejects_only_that_event(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": CONFIG})
    good = json.dumps(_event("1.1"))
    body = f'{{"events": [{good}, {{"enterprise_number": "0367", "event_type": "hangup", '
    body += '"call_unique_id": "1.2", "payload": {"Phone": "\\ud800"}}]}'
    reply = await _post(database_url, body.encode())
    assert reply.status_code == 202
    assert reply.json()["accepted"] == 1
    assert [r["index"] for r in reply.json()["rejected"]] == [1]


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param('"payload": {"Phone": "\\u0000"}', id="nul-in-payload"),
        pytest.param('"payload": {"\\u0000": 1}', id="nul-in-key"),
    ],
)
async def test_a_nul_in_one_event_rejects_only_that_event(
    db: asyncpg.Connection, database_url: str, poison: str
) -> None:
    await create_enterprise(db, "0367", integrations={"retailcrm": CONFIG})
    good = json.dumps(_event("2.1"))
    body = f'{{"events": [{good}, {{"enterprise_number": "0367", "event_type": "hangup", '
    body += f'"call_unique_id": "2.2", {poison}}}]}}'
    reply = await _post(database_url, body.encode())
    assert reply.status_code == 202
    assert reply.json()["accepted"] == 1
    assert [r["index"] for r in reply.json()["rejected"]] == [1]


# occurred_at values Python parses: every offset Python allows (up to 24 h, with seconds and
# fractions) on any date it can represent, written in the forms fromisoformat accepts.
_offsets = st.timedeltas(
    min_value=timedelta(hours=-23, minutes=-59, seconds=-59),
    max_value=timedelta(hours=23, minutes=59, seconds=59),
)
_instants = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
)


@st.composite
def _occurred_at(draw: st.DrawFn) -> str:
    moment = draw(_instants).replace(tzinfo=timezone(draw(_offsets)))
    spec = draw(st.sampled_from(["auto", "seconds", "minutes", "microseconds"]))
    text = moment.isoformat(timespec=spec)
    if text.endswith("+00:00") and draw(st.booleans()):
        return text.removesuffix("+00:00") + "Z"
    return text


_extension = st.text(alphabet="0123456789", min_size=1, max_size=40)


@st.composite
def _risky_event(draw: st.DrawFn, unique_id: str) -> dict[str, Any]:
    """An event whose occurred_at or dial key may or may not be storable."""
    event: dict[str, Any] = {
        "enterprise_number": "0367",
        "event_type": draw(st.sampled_from(["dial", "hangup"])),
        "call_unique_id": unique_id,
        "occurred_at": draw(_occurred_at()),
        "payload": {"Phone": "+375291234567"},
    }
    if event["event_type"] == "dial":
        event["payload"]["Extensions"] = draw(st.lists(_extension, max_size=120))
    return event


@st.composite
def _batch(draw: st.DrawFn, tag: int) -> list[dict[str, Any]]:
    size = draw(st.integers(min_value=1, max_value=6))
    events = []
    for i in range(size):
        unique_id = f"{tag}.{i}"
        if draw(st.booleans()):
            events.append(_event(unique_id, n=i))
        else:
            events.append(draw(_risky_event(unique_id)))
    return events


async def test_values_postgresql_refuses_are_rejected_alone_in_concurrent_batches(
    db: asyncpg.Connection, database_url: str
) -> None:
    """Hypothesis draws occurred_at values over Python's whole range (offsets up to 24 h, dates
    at both ends of the calendar) and dials with long Extensions lists; batches are posted
    concurrently (so they share group commits). Every request is answered 202, every event not
    rejected is committed, and offsets PostgreSQL refuses (16 h and more) are rejected."""
    await create_enterprise(db, "0367", integrations={"retailcrm": CONFIG})
    rounds: list[list[list[dict[str, Any]]]] = []

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        base = len(rounds) * 10
        rounds.append([data.draw(_batch(base + k)) for k in range(4)])

    collect()
    for sample in (
        "2025-11-26T10:00:00+20:00",
        "2025-11-26T10:00:00-16:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
    ):  # the known refusals, whatever Hypothesis drew
        rounds.append(
            [[_event(f"k{len(rounds)}.0"), {**_event(f"k{len(rounds)}.1"), "occurred_at": sample}]]
        )

    failures: list[str] = []
    async with (
        running_service(service_settings(database_url), parts={"events"}) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=30) as http,
    ):
        for batches in rounds:
            replies = await asyncio.gather(
                *(http.post("/api/events", json={"events": batch}) for batch in batches)
            )
            for batch, reply in zip(batches, replies, strict=True):
                if reply.status_code != 202:
                    failures.append(f"{reply.status_code} {reply.text[:200]} for {batch!r:.300}")
                    continue
                rejected = {r["index"] for r in reply.json()["rejected"]}
                for index, event in enumerate(batch):
                    stored = await db.fetchval(
                        "SELECT count(*) FROM retailcrm_outbox WHERE call_unique_id = $1",
                        event["call_unique_id"],
                    )
                    if index in rejected:
                        if stored:
                            failures.append(f"rejected but stored: {event!r:.300}")
                    elif stored != 1:
                        failures.append(f"accepted but not stored: {event!r:.300}")
                    if _refused_offset(event.get("occurred_at")) and index not in rejected:
                        failures.append(f"impossible offset accepted: {event['occurred_at']}")
    assert failures == []


def _refused_offset(value: str | None) -> bool:
    if value is None:
        return False
    offset = datetime.fromisoformat(value).utcoffset()
    return offset is not None and abs(offset) >= timedelta(hours=16)
