"""Running the sandbox: under uvicorn in a thread or a background task, and as a CLI process."""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette

from retailcrm_service.ops.heap import freeze_startup_objects
from retailcrm_service.ops.http_server import UVICORN_OPTIONS
from retailcrm_service.sandbox._config import SCOPES, SandboxConfig
from retailcrm_service.sandbox._core import Sandbox
from retailcrm_service.sandbox._http import create_sandbox_app
from vochi_crm_client import BackgroundTasks

logger = logging.getLogger(__name__)
_START_DEADLINE = 10.0


class _Server(uvicorn.Server):
    """uvicorn without signal handling: the embedding test or thread owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this. Without it, uvicorn serving a pre-bound socket answers each
    # keep-alive request only after a ~40 ms delayed ACK (Nagle): ~22 requests/s instead of ~1000.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def _config(app: Starlette, **options: Any) -> uvicorn.Config:
    """How every sandbox server runs uvicorn (``options`` add to it)."""
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        **UVICORN_OPTIONS,
        **options,
    )


def _uvicorn(app: Starlette) -> _Server:
    return _Server(_config(app, lifespan="on"))


def _accounts(
    api_key: str | None, accounts: Sequence[dict[str, Any]], demo_data: bool
) -> tuple[list[dict[str, Any]], str]:
    """The accounts to start with and the key ``.api_key`` exposes (generated when none given)."""
    if accounts:
        first = accounts[0]
        key = first.get("api_key") or next(
            (k["key"] if isinstance(k, dict) else k for k in first.get("api_keys", [])), ""
        )
        return list(accounts), str(key)
    key = api_key or secrets.token_hex(16)
    spec = {"name": "test", "api_key": key, "scopes": sorted(SCOPES), "demo": demo_data}
    return [spec], key


class _Runner:
    def __init__(
        self,
        *,
        api_key: str | None = None,
        accounts: Sequence[dict[str, Any]] = (),
        demo_data: bool = True,
        config: SandboxConfig | None = None,
        rate_limit: bool | None = None,
        host: str = "127.0.0.1",
        **app_options: Any,
    ) -> None:
        seed, self.api_key = _accounts(api_key, accounts, demo_data)
        self.app = create_sandbox_app(
            accounts=seed, config=config, rate_limit=rate_limit, **app_options
        )
        self.sandbox: Sandbox = self.app.state.sandbox
        self._host = host
        self._sock = _bind(host)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = _uvicorn(self.app)

    def state(
        self, account: str | None = None, *, requests: int | None = None, since: int = 0
    ) -> dict[str, Any]:
        """A snapshot of everything the sandbox recorded (same as ``GET /_sandbox/state``)."""
        return self.sandbox.state.view(account=account, requests=requests, since=since)

    def seed(self, *accounts: dict[str, Any]) -> None:
        self.sandbox.seed(accounts)

    def reset(self) -> None:
        self.sandbox.reset()

    def add_fault(self, **spec: Any) -> dict[str, Any]:
        return self.sandbox.add_fault(spec)

    def clear_faults(self) -> None:
        self.sandbox.clear_faults()


class SandboxServer(_Runner):
    """``with SandboxServer() as crm:`` — the sandbox on a free 127.0.0.1 port, in a thread."""

    def __enter__(self) -> SandboxServer:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_DEADLINE
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sandbox server did not start")
            time.sleep(0.005)
        self.control = SandboxControl(self.url)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.control.close()
        self._server.should_exit = True
        self._thread.join(timeout=_START_DEADLINE)
        self._sock.close()


class AsyncSandboxServer(_Runner):
    """``async with AsyncSandboxServer() as crm:`` — the same, served by this event loop."""

    async def __aenter__(self) -> AsyncSandboxServer:
        self._tasks = BackgroundTasks("sandbox-server", logger=logger)
        self._tasks.open()
        self._tasks.start(self._server.serve, [self._sock], name="sandbox-server")
        try:
            with anyio.fail_after(_START_DEADLINE):
                # uvicorn offers no "started" event to wait on, only this flag.
                while not self._server.started:
                    if not self._tasks.running:  # it failed (and the owner logged why)
                        raise RuntimeError("the sandbox server did not start")
                    await anyio.sleep(0.005)
        except BaseException:
            self._server.should_exit = True
            await self._tasks.close()
            self._sock.close()
            raise
        self.control = AsyncSandboxControl(self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.control.aclose()
            self._server.should_exit = True
        finally:
            # A clean exit lets uvicorn finish its shutdown; leaving on an error cancels it.
            await self._tasks.close(grace=math.inf if exc_type is None else 0.0)
            self._sock.close()


def _state_query(account: str | None, requests: int | None, since: int) -> dict[str, str]:
    query = {"since": str(since)}
    if account:
        query["account"] = account
    if requests is not None:
        query["requests"] = str(requests)
    return query


def _json_object(reply: httpx.Response) -> dict[str, Any]:
    """A control-API answer: every ``/_sandbox/`` route answers with a JSON object."""
    body: dict[str, Any] = reply.json()
    return body


def _click_spec(**kw: Any) -> dict[str, Any]:
    return {
        "account": kw["account"],
        "userId": kw["user_id"],
        "phone": kw["phone"],
        "site": kw["site"],
        "method": kw["method"],
        "module": kw["module"],
    }


class SandboxControl:
    """A blocking client of the ``/_sandbox/`` control API (for other processes and threads)."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self._http.request(method, f"/_sandbox/{path}", json=body)
        reply.raise_for_status()
        return _json_object(reply)

    def state(
        self, account: str | None = None, *, requests: int | None = None, since: int = 0
    ) -> dict[str, Any]:
        reply = self._http.get("/_sandbox/state", params=_state_query(account, requests, since))
        reply.raise_for_status()
        return _json_object(reply)

    def reset(self) -> None:
        self._call("POST", "reset")

    def seed(self, *accounts: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "seed", {"accounts": list(accounts)})

    def add_fault(self, **spec: Any) -> dict[str, Any]:
        return self._call("POST", "faults", spec)

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    def settings(self, **values: Any) -> dict[str, Any]:
        return self._call("POST", "settings", values)

    def click_to_call(
        self,
        *,
        user_id: int,
        phone: str,
        account: str | None = None,
        site: str | None = None,
        method: str = "GET",
        module: str | None = None,
    ) -> dict[str, Any]:
        spec = _click_spec(
            account=account, user_id=user_id, phone=phone, site=site, method=method, module=module
        )
        reply = self._call("POST", "callbacks/click-to-call", spec)
        callback: dict[str, Any] = reply["callback"]
        return callback

    def set_user_status(
        self, *, user_id: int, status: str, account: str | None = None, method: str = "GET"
    ) -> dict[str, Any] | None:
        spec = {"account": account, "userId": user_id, "status": status, "method": method}
        reply = self._call("POST", "callbacks/user-status", spec)
        callback: dict[str, Any] | None = reply["callback"]
        return callback

    def account_url(self, *, code: str, account: str | None = None) -> dict[str, Any]:
        spec = {"account": account, "code": code}
        reply = self._call("POST", "callbacks/account-url", spec)
        callback: dict[str, Any] = reply["callback"]
        return callback

    def activity(
        self, *, code: str, active: bool, freeze: bool = False, account: str | None = None
    ) -> dict[str, Any] | None:
        spec = {"account": account, "code": code, "active": active, "freeze": freeze}
        reply = self._call("POST", "callbacks/activity", spec)
        callback: dict[str, Any] | None = reply["callback"]
        return callback


class AsyncSandboxControl:
    """The same control client for async code."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        reply = await self._http.request(method, f"/_sandbox/{path}", json=body)
        reply.raise_for_status()
        return _json_object(reply)

    async def state(
        self, account: str | None = None, *, requests: int | None = None, since: int = 0
    ) -> dict[str, Any]:
        params = _state_query(account, requests, since)
        reply = await self._http.get("/_sandbox/state", params=params)
        reply.raise_for_status()
        return _json_object(reply)

    async def reset(self) -> None:
        await self._call("POST", "reset")

    async def seed(self, *accounts: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "seed", {"accounts": list(accounts)})

    async def add_fault(self, **spec: Any) -> dict[str, Any]:
        return await self._call("POST", "faults", spec)

    async def clear_faults(self) -> None:
        await self._call("DELETE", "faults")

    async def settings(self, **values: Any) -> dict[str, Any]:
        return await self._call("POST", "settings", values)

    async def click_to_call(
        self,
        *,
        user_id: int,
        phone: str,
        account: str | None = None,
        site: str | None = None,
        method: str = "GET",
        module: str | None = None,
    ) -> dict[str, Any]:
        spec = _click_spec(
            account=account, user_id=user_id, phone=phone, site=site, method=method, module=module
        )
        reply = await self._call("POST", "callbacks/click-to-call", spec)
        callback: dict[str, Any] = reply["callback"]
        return callback

    async def set_user_status(
        self, *, user_id: int, status: str, account: str | None = None, method: str = "GET"
    ) -> dict[str, Any] | None:
        spec = {"account": account, "userId": user_id, "status": status, "method": method}
        reply = await self._call("POST", "callbacks/user-status", spec)
        callback: dict[str, Any] | None = reply["callback"]
        return callback

    async def account_url(self, *, code: str, account: str | None = None) -> dict[str, Any]:
        spec = {"account": account, "code": code}
        reply = await self._call("POST", "callbacks/account-url", spec)
        callback: dict[str, Any] = reply["callback"]
        return callback

    async def activity(
        self, *, code: str, active: bool, freeze: bool = False, account: str | None = None
    ) -> dict[str, Any] | None:
        spec = {"account": account, "code": code, "active": active, "freeze": freeze}
        reply = await self._call("POST", "callbacks/activity", spec)
        callback: dict[str, Any] | None = reply["callback"]
        return callback


def cli_accounts(api_keys: Sequence[str]) -> tuple[list[dict[str, Any]], str | None]:
    """Accounts ``account-1``.. with full telephony access and the demo data, one per key;
    without keys, the account ``demo`` with a generated key (returned, to be shown once)."""
    if api_keys:
        accounts = [
            {"name": f"account-{i}", "api_key": key, "scopes": sorted(SCOPES), "demo": True}
            for i, key in enumerate(api_keys, start=1)
        ]
        return accounts, None
    generated = secrets.token_hex(16)
    return [
        {"name": "demo", "api_key": generated, "scopes": sorted(SCOPES), "demo": True}
    ], generated


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8090,
    api_keys: Sequence[str] = (),
    rate_limit: bool = True,
) -> None:
    """``retailcrm-service sandbox``: one account per key (or a demo account), until interrupted."""
    accounts, generated = cli_accounts(api_keys)
    app = create_sandbox_app(accounts=accounts, rate_limit=rate_limit)
    sock = _bind(host, port)
    print(f"RetailCRM sandbox: http://{host}:{sock.getsockname()[1]}", flush=True)
    print(f"state: http://{host}:{sock.getsockname()[1]}/_sandbox/state", flush=True)
    if generated is not None:
        # Printed once for the operator; the sandbox itself only ever shows it masked.
        print(f"demo account API key: {generated}", flush=True)
    logger.info("sandbox.started accounts=%d rate_limit=%s", len(accounts), rate_limit)
    freeze_startup_objects()
    uvicorn.Server(_config(app)).run(sockets=[sock])
