"""/health, /stats, /metrics and the lifespan's component extension point, on a real database."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from retailcrm_service.storage.database import migrate
from retailcrm_service.storage.journal import pg_purge
from tests.support.pg import EmbeddedPostgres, create_enterprise
from tests.support.service import running_service, service_settings


async def test_health_stats_and_metrics_report_the_core(
    db: asyncpg.Connection, database_url: str
) -> None:
    await create_enterprise(db, "0367")
    settings = service_settings(database_url)
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as http:
        await svc.runtime.listener.wait_listening()
        health = await http.get("/health")
        api_health = await http.get("/api/health")
        await http.get("/api/config/0367")
        stats = await http.get("/stats")
        metrics = await http.get("/api/metrics")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["reasons"] == []
    assert body["database"]["ok"]
    assert body["listener"]["state"] == "listening"
    assert body["cache"]["ok"]
    assert api_health.json()["status"] == "ok"
    sections = stats.json()
    assert {"service", "config_cache", "integration_logs", "listener"} <= set(sections)
    assert sections["config_cache"]["full_reloads"] >= 1
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    requests = families["retailcrm_service_http_requests"]
    routes = {s.labels["route"] for s in requests.samples}
    assert "/api/config/{enterprise_number}" in routes
    assert "/api/config/0367" not in routes
    reloads = families["retailcrm_service_cache_full_reloads"]
    assert reloads.type == "counter"
    assert [s.labels for s in reloads.samples if s.name.endswith("_total")] == [{"cache": "config"}]
    assert families["retailcrm_service_listener_connected"].samples[0].value == 1


async def test_health_degrades_while_the_database_is_down_and_recovers(
    private_postgres: EmbeddedPostgres,
) -> None:
    dsn = private_postgres.admin_dsn
    await migrate(dsn)
    settings = service_settings(dsn)
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as http:
        await svc.runtime.listener.wait_listening()
        assert (await http.get("/health")).status_code == 200
        await asyncio.to_thread(private_postgres.stop)
        down = await http.get("/health")
        await asyncio.to_thread(private_postgres.start)
        for _ in range(500):
            recovered = await http.get("/health")
            if recovered.json()["status"] == "ok":
                break
            await asyncio.sleep(0.05)
    assert down.status_code == 503
    assert "database unreachable" in down.json()["reasons"]
    assert recovered.status_code == 200
    assert recovered.json()["status"] == "ok"


async def test_parts_start_in_the_documented_order_and_their_stats_go_with_them(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="retailcrm_service.runtime")
    parts = {"events", "asterisk", "smart_redirect"}
    async with running_service(service_settings(database_url), parts=parts) as svc:
        runtime = svc.runtime
        assert runtime.events is not None
        assert runtime.smart_redirect is not None
        assert runtime.call_control is not None
        assert runtime.events.delivery is not None
        assert runtime.events.delivery.pacer is runtime.pacer  # one budget per API key
        async with httpx.AsyncClient(base_url=svc.url) as http:
            stats = (await http.get("/stats")).json()
        assert stats["service"]["components"] == ["asterisk", "events", "smart_redirect"]
        assert {"outbox", "asterisk", "smart_redirect", "config_cache"} <= set(stats)
        metrics = runtime.metrics
    started = [
        r.getMessage().split("name=")[1]
        for r in caplog.records
        if r.getMessage().startswith("runtime.part_started")
    ]
    assert started == ["events", "asterisk", "smart_redirect"]
    assert metrics.snapshot() == {}  # every stats source left with its part


async def test_retention_deletes_only_old_rows_of_this_integration(
    db: asyncpg.Connection, database_url: str
) -> None:
    await db.execute(
        """INSERT INTO integration_logs (enterprise_number, integration_type, event_type, status,
                                         created_at)
           VALUES ('0367', 'retailcrm', 'old', 'success', now() - interval '40 days'),
                  ('0367', 'retailcrm', 'new', 'success', now() - interval '2 days'),
                  ('0367', 'uon', 'old', 'success', now() - interval '40 days')"""
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        deleted = await pg_purge(pool, batch=1)(30)
    finally:
        await pool.close()
    left = await db.fetch("SELECT integration_type, event_type FROM integration_logs ORDER BY id")
    assert deleted == 1
    assert [(r["integration_type"], r["event_type"]) for r in left] == [
        ("retailcrm", "new"),
        ("uon", "old"),
    ]
