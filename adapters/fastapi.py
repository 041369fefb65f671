"""FastAPI glue: a lifespan that owns a ``CrmClient``, a dependency to reach it, /health, /stats
and /metrics.

::

    registry = CollectorRegistry()
    app = FastAPI(lifespan=crm_lifespan(lambda: CrmClient(dsn=..., targets=...), registry=registry))
    app.include_router(operations_router(registry=registry))

With a ``registry``, the lifespan registers the client's collector
(``vochi_crm_client.prometheus.CrmClientCollector``) for as long as the client is open, and the
router serves the registry as ``GET /metrics``.

    @app.post("/dial")
    async def dial(crm: CrmDep) -> dict: ...

The client lives exactly as long as the application: opened before the first request, drained
and closed after the last one. It is reached through the lifespan state, never a global.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import Scope

from vochi_crm_client import CrmClient
from vochi_crm_client.prometheus import CrmClientCollector

__all__ = ["CrmDep", "crm_lifespan", "crm_of", "get_crm", "operations_router"]

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]


def crm_lifespan(
    make_client: Callable[[], CrmClient],
    *,
    inner: Lifespan | None = None,
    registry: CollectorRegistry | None = None,
) -> Lifespan:
    """A lifespan that opens ``make_client()`` for the app's lifetime (and then ``inner``'s);
    with ``registry``, the client's counters are in it while the client is open."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with make_client() as crm:
            collector = CrmClientCollector(lambda: crm)
            if registry is not None:
                registry.register(collector)
            try:
                if inner is None:
                    yield {"crm": crm}
                    return
                async with inner(app) as state:
                    yield {**(state or {}), "crm": crm}
            finally:
                if registry is not None:
                    registry.unregister(collector)

    return lifespan


def get_crm(request: Request) -> CrmClient:
    """The dependency: the ``CrmClient`` the lifespan opened."""
    return crm_of(request.scope)


def crm_of(scope: Scope) -> CrmClient:
    """The ``CrmClient`` the lifespan opened, from a request's ASGI scope (for raw ASGI code)."""
    crm = scope.get("state", {}).get("crm")
    if not isinstance(crm, CrmClient):
        raise RuntimeError("no CrmClient in the lifespan state: use crm_lifespan()")
    return crm


CrmDep = Annotated[CrmClient, Depends(get_crm)]


def operations_router(
    *,
    extra_stats: Callable[[], dict[str, Any]] | None = None,
    registry: CollectorRegistry | None = None,
) -> APIRouter:
    """``GET /health`` (the client's summary), ``GET /stats`` (its counters and ``extra_stats``),
    and with ``registry`` ``GET /metrics`` (the registry in Prometheus' text format).

    ``/health`` answers 200 even when a CRM is down: the call service itself is healthy, since
    emit never waits on a CRM; the body says ``degraded`` and which breaker is open.
    """
    router = APIRouter()

    @router.get("/health")
    async def health(crm: CrmDep) -> dict[str, Any]:
        return crm.health()

    @router.get("/stats")
    async def stats(crm: CrmDep) -> dict[str, Any]:
        out = crm.stats()
        if extra_stats is not None:
            out.update(extra_stats())
        return out

    if registry is not None:

        @router.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
