"""Run the RetailCRM service app for real on a free 127.0.0.1 port inside the test's event loop.

    settings = service_settings(database_url, allow_http=True)
    async with running_service(settings) as svc:
        async with httpx.AsyncClient(base_url=svc.url) as http:
            await http.get("/health")
        svc.runtime.configs, svc.runtime.logs ...

``parts`` is passed to ``create_app`` (default: none, so tests of one area do not start
another area's workers). ``serving(app)`` does the same for any ASGI app (a stand-in CRM).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from retailcrm_service.app import create_app
from retailcrm_service.runtime import Runtime
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings


def service_settings(database_url: str, **overrides: Any) -> Settings:
    """Test settings: random JWT and encryption secrets, http CRM domains allowed."""
    values: dict[str, Any] = {
        "database_url": Secret(database_url),
        "jwt_secret": Secret(secrets.token_urlsafe(32)),
        "secret_key": Secret(secrets.token_urlsafe(32)),
        "allow_http": True,
        "data_dir": Path("/nonexistent-test-data-dir"),
        "db_pool_max_size": 5,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class RunningService:
    app: FastAPI
    url: str
    port: int

    @property
    def runtime(self) -> Runtime:
        runtime = self.app.state.runtime
        assert runtime is not None, "the service is not running"
        return runtime


@asynccontextmanager
async def serving(app: Any, **options: Any) -> AsyncIterator[str]:
    """``app`` under uvicorn in this event loop on a free 127.0.0.1 port; yields its base URL.
    ``options`` override the uvicorn.Config defaults below (e.g. ``lifespan="off"``)."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "warning",
        "access_log": False,
        "proxy_headers": False,
        "lifespan": "on",
    }
    server = uvicorn.Server(uvicorn.Config(app, **{**values, **options}))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped during startup")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def running_service(
    settings: Settings, *, parts: Collection[str] = ()
) -> AsyncIterator[RunningService]:
    app = create_app(settings, parts=parts)
    async with serving(app) as url:
        yield RunningService(app=app, url=url, port=int(url.rsplit(":", 1)[1]))
