"""Operations: ``/health`` (open), ``/stats`` and ``/metrics`` (internal), also under ``/api/``.

The ``/api/`` aliases are what nginx exposes as ``/retailcrm/api/health`` etc.
``/health`` answers ``{"status": "ok"|"degraded", "reasons": [...]}`` with the state of the
database, the NOTIFY listener, the config cache and the API keys (how many enterprises' keys this
instance cannot decrypt; which ones is in ``/stats``); HTTP 503 only when the database is
unreachable.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security.admin_auth import require_internal

router = APIRouter(tags=["ops"])

DB_PROBE_TIMEOUT = 2.0


async def _database(runtime: Runtime) -> tuple[dict[str, Any], str | None]:
    try:
        async with asyncio.timeout(DB_PROBE_TIMEOUT):
            await runtime.pool.fetchval("SELECT 1")
    except Exception as exc:  # any failure is a health fact, not an error of this route
        return {"ok": False, "error": type(exc).__name__}, "database unreachable"
    return {"ok": True}, None


def _listener(runtime: Runtime) -> tuple[dict[str, Any], str | None]:
    listener = runtime.listener
    if listener is None:
        return {"ok": False, "state": "absent"}, "NOTIFY listener not running"
    stats = listener.stats()
    connected = stats.get("state") == "listening"
    age = stats.get("heartbeat_age")
    info = {"ok": connected, **stats}
    if not connected:
        return info, f"NOTIFY listener {stats.get('state')}"
    if isinstance(age, (int, float)) and age > listener.settings.heartbeat_timeout:
        info["ok"] = False
        return info, f"NOTIFY heartbeat {age:.0f}s old"
    return info, None


def _cache(runtime: Runtime) -> tuple[dict[str, Any], str | None]:
    stats = runtime.configs.stats()
    info = {
        "ok": stats.get("full_reloads", 0) > 0,
        "size": stats.get("size"),
        "active": stats.get("active"),
        "snapshot_age": stats.get("snapshot_age"),
    }
    if not info["ok"]:
        return info, "config cache never fully loaded"
    return info, None


def _keys(runtime: Runtime) -> tuple[dict[str, Any], str | None]:
    unreadable = runtime.configs.unreadable_keys()
    info = {"ok": not unreadable, "unreadable": len(unreadable)}
    if unreadable:
        return info, (
            f"the API key of {len(unreadable)} enterprise(s) cannot be decrypted"
            " (RETAILCRM_SECRET_KEY wrong or missing); their events wait"
        )
    return info, None


async def _outbox(runtime: Runtime) -> dict[str, Any]:
    """Backlog and oldest due event of the durable outbox; {} when not running."""
    events = runtime.events
    if events is None:
        return {}
    try:
        async with asyncio.timeout(DB_PROBE_TIMEOUT):
            return dict(await events.health())
    except Exception as exc:  # the database probe above already reports the outage
        return {"error": type(exc).__name__}


async def _health(runtime: Runtime) -> JSONResponse:
    database, db_reason = await _database(runtime)
    listener, listener_reason = _listener(runtime)
    cache, cache_reason = _cache(runtime)
    keys, keys_reason = _keys(runtime)
    outbox = await _outbox(runtime)
    reasons = [r for r in (db_reason, listener_reason, cache_reason, keys_reason) if r]
    body = {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "database": database,
        "listener": listener,
        "cache": cache,
        "api_keys": keys,
        "outbox": outbox,
    }
    # 503 only when the database is gone: a missing listener or cache still serves requests.
    return JSONResponse(body, status_code=503 if db_reason else 200)


@router.get("/health")
@router.get("/api/health")
async def health(runtime: RuntimeDep) -> JSONResponse:
    return await _health(runtime)


@router.get("/stats", dependencies=[Depends(require_internal)])
@router.get("/api/stats", dependencies=[Depends(require_internal)])
async def stats(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.metrics.snapshot()


@router.get("/metrics", dependencies=[Depends(require_internal)])
@router.get("/api/metrics", dependencies=[Depends(require_internal)])
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
