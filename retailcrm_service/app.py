"""The RetailCRM service's ASGI app: ``create_app(settings)`` and ``serve(host, port)``.

The lifespan opens, in order, and closes in reverse: the asyncpg pool, one shared
``httpx.AsyncClient``, the ``integration_logs`` writer, the config cache (plus its first full
load), the NOTIFY listener, then the registered background COMPONENTS. Everything is reached
through ONE ``Runtime`` object on ``app.state.runtime``, via the dependency ``get_runtime``::

    from retailcrm_service.app import Runtime, get_runtime

    @router.post("/api/thing")
    async def thing(runtime: Runtime = Depends(get_runtime)) -> ...:
        config = await runtime.configs.get("0367")        # RetailCrmConfig | None
        client = runtime.retailcrm(config)                # RetailCrmClient for that account
        runtime.logs.write("0367", "thing", request_data=..., response_data=..., status="success")

EXTENSION POINTS (other issues add one line each, with a targeted edit):

- ``COMPONENTS``: ``(name, factory)`` pairs; ``factory(runtime)`` returns an async context manager
  that the lifespan enters after the core is up (in list order) and exits in reverse before the
  core closes. Its ``__aenter__`` value is kept as ``runtime.components[name]``.
- ``_include_routers``: one ``app.include_router(...)`` per ``retailcrm_service/routes/<area>.py``.
- ``runtime.metrics.registry`` for Prometheus collectors; ``runtime.metrics.add_source(name, fn)``
  for a section of ``/stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

import asyncpg
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from retailcrm_service import __version__
from retailcrm_service.asterisk import asterisk_component
from retailcrm_service.config import ConfigCache, RetailCrmConfig
from retailcrm_service.ingest import events_component
from retailcrm_service.logs import IntegrationLogWriter, pg_purge, pg_sink
from retailcrm_service.metrics import Metrics
from retailcrm_service.retailcrm_api import RetailCrmClient
from retailcrm_service.settings import Settings
from retailcrm_service.smart_redirect import smart_redirect_component
from vochi_crm_client import Change, ChangeListener, ListenerSettings

logger = logging.getLogger(__name__)

ComponentFactory = Callable[["Runtime"], AbstractAsyncContextManager[Any]]

# Background components (name, factory(runtime) -> async context manager), opened in order.
COMPONENTS: list[tuple[str, ComponentFactory]] = [
    ("events", events_component),  # intake + delivery workers (retailcrm_service.ingest)
    ("asterisk", asterisk_component),  # SSH pool + owned background jobs
    ("smart_redirect", smart_redirect_component),  # after "events" (shares its pacer)
]


@dataclass(eq=False, kw_only=True)
class Runtime:
    """Everything the lifespan owns, as one object (``app.state.runtime``)."""

    settings: Settings
    pool: asyncpg.Pool
    http: httpx.AsyncClient
    configs: ConfigCache
    logs: IntegrationLogWriter
    metrics: Metrics
    listener: ChangeListener | None = None
    started_at: float = field(default_factory=time.monotonic)
    components: dict[str, Any] = field(default_factory=dict)

    def retailcrm(
        self, config: RetailCrmConfig, *, timeout: float | None = None
    ) -> RetailCrmClient:
        """A client for the enterprise's account (the shared HTTP client, the key as a header)."""
        if config.api_key is None or not config.domain:
            raise ValueError(
                f"enterprise {config.enterprise_number} has no usable RetailCRM config"
            )
        return RetailCrmClient(
            domain=config.domain,
            api_key=config.api_key,
            http=self.http,
            timeout=self.settings.retailcrm_timeout if timeout is None else timeout,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "components": sorted(self.components),
        }


def get_runtime(request: Request) -> Runtime:
    """FastAPI dependency: the running service's ``Runtime`` (503 while starting/stopping)."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        from retailcrm_service.routes import ApiError

        raise ApiError(503, "unavailable", "the service is starting or stopping")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
"""Route parameter annotation: ``runtime: RuntimeDep``."""


def _include_routers(app: FastAPI) -> None:
    # One line per routes/<area>.py.
    from retailcrm_service.routes import admin, callbacks, config, events, ops, smart_redirect

    app.include_router(ops.router)
    app.include_router(config.router)
    app.include_router(admin.router)
    app.include_router(events.router)
    app.include_router(smart_redirect.router)
    app.include_router(callbacks.router)


# Config keys whose change alters what the service reads (smart: smart-redirect settings).
_WATCHED_KEYS = frozenset({"*", "retailcrm", "smart"})


async def _open_listener(runtime: Runtime, stack: AsyncExitStack) -> ChangeListener:
    """The library's LISTEN integrations_changed connection, keeping the config cache coherent."""

    def on_change(change: Change) -> None:
        if change.integration_type in _WATCHED_KEYS:
            runtime.configs.invalidate(change.enterprise_number)

    async def on_reload() -> None:
        await runtime.configs.refresh_all()

    listener = ChangeListener(
        dsn=runtime.settings.database_url.get_secret_value(),
        on_change=on_change,
        on_reload=on_reload,
        settings=ListenerSettings(application_name="retailcrm-service-listener"),
    )
    return await stack.enter_async_context(listener)


def _lifespan(components: Sequence[tuple[str, ComponentFactory]]) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings: Settings = app.state.settings
        metrics: Metrics = app.state.metrics
        async with AsyncExitStack() as stack:
            pool = await asyncpg.create_pool(
                settings.database_url.get_secret_value(),
                min_size=settings.db_pool_min_size,
                max_size=settings.db_pool_max_size,
            )
            stack.push_async_callback(pool.close)
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    timeout=settings.retailcrm_timeout,
                    limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
                    follow_redirects=False,
                )
            )
            logs = await stack.enter_async_context(
                IntegrationLogWriter(
                    sink=pg_sink(pool),
                    purge=pg_purge(pool),
                    retention_days=settings.log_retention_days,
                )
            )
            configs = await stack.enter_async_context(
                ConfigCache(pool=pool, secret_key=settings.secret_key)
            )
            runtime = Runtime(
                settings=settings, pool=pool, http=http, configs=configs, logs=logs, metrics=metrics
            )
            try:
                await configs.refresh_all()
            except Exception as exc:  # start degraded; the periodic reload retries
                logger.warning("app.initial_config_load_failed error=%s", type(exc).__name__)
            runtime.listener = await _open_listener(runtime, stack)
            metrics.add_source("service", runtime.stats)
            metrics.add_source("config_cache", configs.stats)
            metrics.add_source("integration_logs", logs.stats)
            metrics.add_source("listener", runtime.listener.stats)
            for name, factory in components:
                runtime.components[name] = await stack.enter_async_context(factory(runtime))
                logger.info("app.component_started name=%s", name)
            app.state.runtime = runtime
            logger.info("app.started components=%d", len(components))
            try:
                yield
            finally:
                app.state.runtime = None
                logger.info("app.stopping")

    return lifespan


class _RequestMetrics:
    """Counts requests by route template (never by raw path: no ids or tokens in labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

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


def create_app(
    settings: Settings,
    *,
    components: Sequence[tuple[str, ComponentFactory]] | None = None,
) -> FastAPI:
    """The service app; ``components`` defaults to ``COMPONENTS``."""
    from retailcrm_service.routes import install_error_handlers

    metrics = Metrics()
    app = FastAPI(
        title="Vochi RetailCRM service",
        version=__version__,
        lifespan=_lifespan(list(COMPONENTS if components is None else components)),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    install_error_handlers(app)
    _include_routers(app)
    static_dir = resources.files("retailcrm_service") / "static"
    app.mount("/retailcrm-admin/static", StaticFiles(directory=str(static_dir)), name="static")
    app.add_middleware(_RequestMetrics, metrics=metrics)
    return app


def serve(host: str = "127.0.0.1", port: int = 8019) -> None:
    """``retailcrm-service serve``: migrate, then run the app under uvicorn."""
    import uvicorn

    from retailcrm_service.db import migrate

    settings = dataclasses.replace(Settings.from_env(), host=host, port=port)
    asyncio.run(migrate(settings.database_url.get_secret_value()))
    app = create_app(settings)
    # No access log: a one-time login link carries its token in the query string.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=host, port=port, access_log=False, proxy_headers=False)
