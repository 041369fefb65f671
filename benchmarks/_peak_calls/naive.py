"""The baseline: the previous system's path, rebuilt here (never in the product) to be measured.

- ``naive-call-service``: the host webhooks (the same routes and the same payload translation
  as ``vochi-call-service``), each answered at once after starting a fire-and-forget task that
  POSTs that one event to the RetailCRM service (no batching, no retry, no buffer bound: a
  failed POST is gone).
- ``naive-service``: ``POST /api/events`` reads the enterprise's config from PostgreSQL for
  every event, maps it with the product's mapping, and makes one RetailCRM request per entity
  at once: ``telephony/call/event`` for a popup, ``telephony/calls/upload`` with one call for a
  hangup. No pacing, no retry, no durability: an error or a 503 loses that popup or that call.

Both are FastAPI apps under uvicorn (one process each), like the real ones, and count their
PostgreSQL queries the same way (``_peak_calls.instrument``). ``GET /stats`` says how many of
their requests are still in flight (the benchmark waits for zero before it counts loss).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from adapters.translate import Skipped, Translator
from retailcrm_service.crm.client import RetailCrmClient, RetailCrmError
from retailcrm_service.crm.mapping import MappingConfig, history_call, popup_event

WEBHOOKS = ("start", "dial", "bridge", "hangup", "download")
_QUEUED = b'{"status":"queued"}'
logger = logging.getLogger(__name__)


def call_service_app(dsn: str, target: str) -> FastAPI:
    """Webhook -> translate -> ``create_task(POST one event)`` -> 200."""
    tokens: dict[str, str] = {}
    tasks: set[asyncio.Task[Any]] = set()
    counts: Counter[str] = Counter()
    translate = Translator()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conn = await asyncpg.connect(dsn)
        try:
            for row in await conn.fetch("SELECT number, name2 FROM enterprises WHERE active"):
                tokens[row["name2"]] = row["number"]
        finally:
            await conn.close()
        async with httpx.AsyncClient(timeout=3.0) as http:
            app.state.http = http
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def post(http: httpx.AsyncClient, event: dict[str, Any]) -> None:
        try:
            reply = await http.post(target, json=event)
            counts["posted" if reply.status_code < 300 else f"http_{reply.status_code}"] += 1
        except httpx.HTTPError as exc:
            counts[type(exc).__name__] += 1

    def add(host_event: str) -> None:
        async def webhook(request: Request) -> Response:
            body = json.loads(await request.body())
            number = tokens.get(request.headers.get("token") or body.get("Token") or "")
            if number is None:
                return JSONResponse({"error": {"code": "unknown_token"}}, status_code=403)
            event = translate(
                host_event, body, enterprise_number=number, received_at=datetime.now(UTC)
            )
            if isinstance(event, Skipped):
                return JSONResponse({"status": "skipped", "reason": event.reason})
            task = asyncio.create_task(post(request.app.state.http, event.to_json()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)  # fire and forget
            return Response(_QUEUED, media_type="application/json")

        app.add_api_route(f"/{host_event}", webhook, methods=["POST"])

    for host_event in WEBHOOKS:
        add(host_event)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {"in_flight": len(tasks), "outcomes": dict(counts)}

    return app


def service_app(dsn: str) -> FastAPI:
    """``POST /api/events``: per event, config from PostgreSQL, then RetailCRM at once."""
    counts: Counter[str] = Counter()
    in_flight = [0]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with (
            asyncpg.create_pool(dsn, min_size=1, max_size=10) as pool,
            httpx.AsyncClient(timeout=3.0) as http,
        ):
            app.state.pool = pool
            app.state.http = http
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def send(client: RetailCrmClient, method: str, entity: Any) -> None:
        try:
            if method == "event":
                await client.call_event(entity)
            else:
                await client.calls_upload([entity])
            counts[f"{method}_ok"] += 1
        except RetailCrmError as exc:  # the previous system logged it and moved on
            counts[f"{method}_{type(exc).__name__}"] += 1

    async def handle(app: FastAPI, event: dict[str, Any]) -> None:
        row = await app.state.pool.fetchrow(
            "SELECT integrations_config -> 'retailcrm' AS config FROM enterprises"
            " WHERE number = $1 AND active",
            event["enterprise_number"],
        )
        config = json.loads(row["config"]) if row and row["config"] else {}
        if not config.get("enabled") or not config.get("api_key"):
            counts["not_configured"] += 1
            return
        mapping = MappingConfig.from_config(config)
        client = RetailCrmClient(
            domain=config["domain"], api_key=config["api_key"], http=app.state.http
        )
        payload, kind = event["payload"], event["event_type"]
        if event.get("origin", "live") == "live" and kind in ("dial", "hangup"):
            popup = popup_event(kind, payload, mapping)
            if isinstance(popup, dict):
                await send(client, "event", popup)
        if kind == "hangup":
            call = history_call(payload, mapping)
            if isinstance(call, dict):
                await send(client, "upload", call)

    @app.post("/api/events")
    async def events(request: Request) -> dict[str, int]:
        body = json.loads(await request.body())
        batch = body["events"] if isinstance(body, dict) and "events" in body else [body]
        in_flight[0] += 1
        try:
            for event in batch:
                await handle(request.app, event)
        finally:
            in_flight[0] -= 1
        return {"accepted": len(batch), "duplicates": 0}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {"in_flight": in_flight[0], "outcomes": dict(counts)}

    return app


def serve(app: FastAPI, port: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
