"""The RetailCRM service's ASGI app: ``create_app(settings)`` and ``serve(settings)``.

The lifespan opens the runtime (``retailcrm_service.runtime.open_runtime``: every component, in
its visible order) and puts it on ``app.state.runtime``, where routes reach it through the
``RuntimeDep`` dependency. Routes live in ``retailcrm_service.api``, one module per area.

Two sides. With ``RETAILCRM_PUBLIC_PORT`` set, ``serve`` listens on a second port, the public
side, which nginx's public server block proxies to (deploy/nginx.conf). A request's side is the
port of the socket it arrived on (``scope["server"]``), which no header can change: on the
public side only the admin UI, RetailCRM's callbacks and the dialplan route exist (anything else
is 404), and no caller is internal, whatever its address, ``X-Real-IP`` or ``X-Internal-Token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from retailcrm_service.api.events import EVENTS_PATH, serve_events
from retailcrm_service.api.http import install_error_handlers
from retailcrm_service.ops.logs import RequestIdMiddleware, register_secret
from retailcrm_service.ops.metrics import Metrics
from retailcrm_service.runtime import ALL_PARTS, open_runtime
from retailcrm_service.security.admin_auth import PUBLIC_SIDE
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
            self.metrics.observe_request(
                template, scope["method"], status, time.perf_counter() - started
            )


ADMIN_PREFIX = "/retailcrm-admin"
# The admin pages load only their own script, styles and images; nothing inline, no frames.
ADMIN_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class _AdminHeaders:
    """Security headers on every answer under ``/retailcrm-admin`` (pages, API, assets)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in ADMIN_HEADERS}

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + list(ADMIN_HEADERS)}
            await send(message)

        await self.app(scope, receive, send_wrapper)


# What the public side serves: the admin UI and its API, RetailCRM's callbacks, the dialplan.
_PUBLIC_PREFIXES = ("/retailcrm-admin/",)
_PUBLIC_PATHS = frozenset(
    {
        "/retailcrm-admin",
        "/retailcrm/make-call",
        "/retailcrm/status",
        "/api/callevent/getcustomerdata",
    }
)
_NOT_FOUND = json.dumps(
    {"error": {"code": "not_found", "message": "no such route"}}, separators=(",", ":")
).encode()


def is_public_path(path: str) -> bool:
    """Whether the public side serves ``path`` (dot segments never: routing is literal)."""
    if any(part in (".", "..") for part in path.split("/")):
        return False
    return path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES)


class _Sides:
    """Marks requests that arrived on the public port, and answers 404 for what it lacks."""

    def __init__(self, app: ASGIApp, public_port: int | None) -> None:
        self.app = app
        self.public_port = public_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and _on_port(scope, self.public_port):
            scope[PUBLIC_SIDE] = True
            if scope["type"] != "http" or not is_public_path(scope["path"]):
                await _not_found(scope, send)
                return
        await self.app(scope, receive, send)


def _on_port(scope: Scope, port: int | None) -> bool:
    """Whether the request came in on ``port`` (never when it is None)."""
    server = scope.get("server")
    return port is not None and server is not None and server[1] == port


async def _not_found(scope: Scope, send: Send) -> None:
    if scope["type"] != "http":
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_NOT_FOUND))]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": _NOT_FOUND})


class _ServiceApp(FastAPI):
    """FastAPI, with the call services' ``POST /api/events`` answered before the middleware
    stack (``api.events.serve_events``); everything else, the public side's requests included,
    takes the usual way."""

    def __init__(self, *, public_port: int | None, **options: Any) -> None:
        super().__init__(**options)
        self._public_port = public_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == EVENTS_PATH
            and not _on_port(scope, self._public_port)
        ):
            scope["app"] = self
            await serve_events(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, parts: Collection[str] = ALL_PARTS) -> FastAPI:
    """The service app; ``parts`` selects the optional components (default: all of them)."""
    metrics = Metrics()
    app = _ServiceApp(
        public_port=settings.public_port,
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
    app.add_middleware(_AdminHeaders)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    app.add_middleware(_Sides, public_port=settings.public_port)
    # Outermost: the request id is set for every log line of the request, errors included.
    app.add_middleware(RequestIdMiddleware)
    return app


def serve(settings: Settings) -> None:
    """``retailcrm-service serve``: migrate, then run the app under uvicorn."""
    import uvicorn

    from retailcrm_service.ops.heap import freeze_startup_objects
    from retailcrm_service.ops.http_server import UVICORN_OPTIONS
    from retailcrm_service.ops.instances import check_scale_out
    from retailcrm_service.storage.database import migrate

    for secret in (settings.jwt_secret, settings.secret_key, settings.internal_token):
        if secret is not None:
            register_secret(secret.get_secret_value())
    asyncio.run(migrate(settings.database_url.get_secret_value()))
    asyncio.run(check_scale_out(settings))
    app = create_app(settings)
    freeze_startup_objects()
    # No access log: a one-time login link carries its token in the query string.
    # log_config=None: uvicorn's loggers propagate to the one handler of ops.logs.configure.
    options: dict[str, Any] = {
        "host": settings.host,
        "access_log": False,
        "proxy_headers": False,
        "log_config": None,
        **UVICORN_OPTIONS,
    }
    with contextlib.suppress(KeyboardInterrupt):
        if settings.public_port is None:
            uvicorn.run(app, port=settings.port, **options)
            return
        # One server, two sockets: the internal port and the public one (see _Sides).
        config = uvicorn.Config(app, port=settings.port, **options)
        sockets = [
            config.bind_socket(),
            uvicorn.Config(app, port=settings.public_port, **options).bind_socket(),
        ]
        logger.info(
            "serve.listening internal=%s:%d public=%s:%d",
            settings.host,
            settings.port,
            settings.host,
            settings.public_port,
        )
        uvicorn.Server(config).run(sockets=sockets)
