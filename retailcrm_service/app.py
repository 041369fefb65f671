"""The RetailCRM service's ASGI app: ``create_app(settings)`` and ``serve(settings)``.

The lifespan opens the runtime (``retailcrm_service.runtime.open_runtime``: every component, in
its visible order) and puts it on ``app.state.runtime``, where routes reach it through the
``RuntimeDep`` dependency. Routes live in ``retailcrm_service.api``, one module per area.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from retailcrm_service import __version__
from retailcrm_service.api import include_routers
from retailcrm_service.api.http import install_error_handlers
from retailcrm_service.ops.logs import RequestIdMiddleware, register_secret
from retailcrm_service.ops.metrics import Metrics
from retailcrm_service.runtime import ALL_PARTS, open_runtime
from retailcrm_service.settings import Settings

logger = logging.getLogger(__name__)


def _lifespan(parts: Collection[str]) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings: Settings = app.state.settings
        metrics: Metrics = app.state.metrics
        async with open_runtime(settings, metrics, parts=parts) as runtime:
            app.state.runtime = runtime
            try:
                yield
            finally:
                app.state.runtime = None

    return lifespan


class _RequestMetrics:
    """Counts and times requests by route template (not raw paths: no ids or tokens in labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.http_seconds.labels(template, scope["method"]).observe(
                time.perf_counter() - started
            )


def create_app(settings: Settings, *, parts: Collection[str] = ALL_PARTS) -> FastAPI:
    """The service app; ``parts`` selects the optional components (default: all of them)."""
    metrics = Metrics()
    app = FastAPI(
        title="Vochi RetailCRM service",
        version=__version__,
        lifespan=_lifespan(frozenset(parts)),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    install_error_handlers(app)
    include_routers(app)
    static_dir = resources.files("retailcrm_service") / "static"
    app.mount("/retailcrm-admin/static", StaticFiles(directory=str(static_dir)), name="static")
    app.add_middleware(_RequestMetrics, metrics=metrics)
    # Outermost: the request id is set for every log line of the request, errors included.
    app.add_middleware(RequestIdMiddleware)
    return app


def serve(settings: Settings) -> None:
    """``retailcrm-service serve``: migrate, then run the app under uvicorn."""
    import uvicorn

    from retailcrm_service.ops.instances import check_scale_out
    from retailcrm_service.storage.database import migrate

    for secret in (settings.jwt_secret, settings.secret_key, settings.internal_token):
        if secret is not None:
            register_secret(secret.get_secret_value())
    asyncio.run(migrate(settings.database_url.get_secret_value()))
    asyncio.run(check_scale_out(settings))
    app = create_app(settings)
    # No access log: a one-time login link carries its token in the query string.
    # log_config=None: uvicorn's loggers propagate to the one handler of ops.logs.configure.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            access_log=False,
            proxy_headers=False,
            log_config=None,
        )
