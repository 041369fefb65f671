"""The ASGI app: RetailCRM's API surface plus the ``/_sandbox/`` control API."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from retailcrm_service.sandbox import _callbacks
from retailcrm_service.sandbox._config import SCOPES, SandboxConfig
from retailcrm_service.sandbox._core import Incoming, Outgoing, Sandbox, _utc_now
from retailcrm_service.sandbox._errors import INPUT_ERRORS, ApiError, ControlError

_API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Response(text, status_code=status, media_type="application/json", headers=headers)


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _urlencoded(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """A form body's pairs; other bodies carry none (JSON is not read by RetailCRM, see
    docs/retailcrm.md#errors)."""
    if _media_type(content_type) == "application/x-www-form-urlencoded":
        return parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return []


async def _form_pairs(request: Request) -> tuple[list[tuple[str, str]], str]:
    content_type = request.headers.get("content-type", "")
    if _media_type(content_type) == "multipart/form-data":
        try:
            form = await request.form()
        except Exception as exc:  # python-multipart raises several unrelated types
            raise ApiError(400, INPUT_ERRORS) from exc
        pairs = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = (await value.read()).decode("utf-8", errors="replace")
            pairs.append((key, str(value)))
        return pairs, content_type
    return _urlencoded(content_type, await request.body()), content_type


def _render(response: Outgoing) -> Response:
    if response.html is not None:
        return HTMLResponse(response.html, status_code=response.status, headers=response.headers)
    return _json(response.status, response.body, response.headers)


async def _answer(
    sandbox: Sandbox,
    scope: Scope,
    headers: dict[bytes, bytes],
    form: list[tuple[str, str]],
    content_type: str,
) -> Response:
    key = headers.get(b"x-api-key")
    incoming = Incoming(
        method=scope["method"],
        path=scope["path"],
        query=parse_qsl(
            scope["query_string"].decode("utf-8", errors="replace"), keep_blank_values=True
        ),
        form=form,
        header_key=None if key is None else key.decode("latin-1"),
        base_url=_base_url(scope, headers),
        content_type=content_type,
    )
    return _render(await sandbox.handle(incoming))


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name; of a repeated one the first, as Starlette's ``get``."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)
    return headers


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _base_url(scope: Scope, headers: dict[bytes, bytes]) -> str:
    """``scheme://host[:port]``: the Host header, else the server's address."""
    scheme = scope.get("scheme", "http")
    host = headers.get(b"host")
    if host:
        return f"{scheme}://{host.decode('latin-1')}"
    server = scope.get("server")
    if server is None:
        return f"{scheme}://"
    name, port = server
    if ":" in name:
        name = f"[{name}]"
    return (
        f"{scheme}://{name}" if port == _DEFAULT_PORTS.get(scheme) else f"{scheme}://{name}:{port}"
    )


def _api_route(sandbox: Sandbox) -> Callable[[Request], Awaitable[Response]]:
    """The API's route in the router: for what ``_SandboxApp`` leaves to it (multipart bodies,
    HEAD requests), answered the same way."""

    async def api(request: Request) -> Response:
        try:
            form, content_type = await _form_pairs(request)
        except ApiError as exc:
            return _json(exc.status, exc.body())
        return await _answer(sandbox, request.scope, _headers(request.scope), form, content_type)

    return api


class _SandboxApp(Starlette):
    """Starlette, with RetailCRM's API answered before its middleware and router.

    Every request outside ``/_sandbox/`` is an API call, and in the benchmarks the sandbox stands
    in for RetailCRM on the same machine: the middleware stack, the router and ``Request`` were
    about a third of its CPU per call."""

    def __init__(self, sandbox: Sandbox, **options: Any) -> None:
        super().__init__(**options)
        self._sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in _API_METHODS
            and not scope["path"].startswith("/_sandbox/")
        ):
            headers = _headers(scope)
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if _media_type(content_type) != "multipart/form-data":
                await self._api(scope, receive, send, headers, content_type)
                return
        await super().__call__(scope, receive, send)

    async def _api(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        content_type: str,
    ) -> None:
        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        form = _urlencoded(content_type, b"".join(chunks))
        response = await _answer(self._sandbox, scope, headers, form, content_type)
        await response(scope, receive, send)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deeply
        raise ControlError(400, "invalid_json", "the body is not JSON") from exc
    if not isinstance(body, dict):
        raise ControlError(400, "invalid_json", "the body must be a JSON object")
    return body


def _control(
    handler: Callable[[Request, dict[str, Any]], Awaitable[Any]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            body = await _body(request) if request.method != "GET" else {}
            return _json(200, await handler(request, body))
        except ControlError as exc:
            return _json(exc.status, {"error": {"code": exc.code, "message": exc.message}})
        except (TypeError, ValueError, AttributeError) as exc:
            # A malformed control document (wrong types deep inside a seed or a fault).
            message = f"invalid document: {type(exc).__name__}: {exc}"
            return _json(422, {"error": {"code": "invalid_document", "message": message}})

    return endpoint


def _control_routes(sandbox: Sandbox) -> list[Route]:
    def client(request: Request) -> httpx.AsyncClient:
        callback_client: httpx.AsyncClient = request.app.state.callback_client
        return callback_client

    async def state(request: Request, body: dict[str, Any]) -> Any:
        query = request.query_params
        try:
            requests = int(query["requests"]) if "requests" in query else None
            since = int(query.get("since", 0))
        except ValueError as exc:
            raise ControlError(422, "invalid_query", "requests and since are integers") from exc
        return sandbox.state.view(account=query.get("account"), requests=requests, since=since)

    async def reset(request: Request, body: dict[str, Any]) -> Any:
        sandbox.reset()
        return {"reset": True}

    async def seed(request: Request, body: dict[str, Any]) -> Any:
        accounts = body.get("accounts")
        if not isinstance(accounts, list):
            raise ControlError(422, "invalid_seed", "accounts must be a list")
        seeded = sandbox.seed(accounts)
        return {
            "accounts": [
                {"name": a.name, "keys": [k.view() for k in a.keys.values()]} for a in seeded
            ]
        }

    async def faults(request: Request, body: dict[str, Any]) -> Any:
        if request.method == "POST":
            return sandbox.add_fault(body)
        if request.method == "DELETE":
            sandbox.clear_faults()
        return {"faults": sandbox.state.faults}

    async def settings(request: Request, body: dict[str, Any]) -> Any:
        with sandbox.state.lock:
            if "rate_limit" in body:
                sandbox.rate_limit = bool(body["rate_limit"])
                sandbox.limiter.reset()
            if "account_missing" in body:
                sandbox.state.account_missing = bool(body["account_missing"])
            if "account_exists" in body:
                sandbox.state.account(body.get("account")).exists = bool(body["account_exists"])
            return {
                "rate_limit": sandbox.rate_limit,
                "account_missing": sandbox.state.account_missing,
            }

    async def click_to_call(request: Request, body: dict[str, Any]) -> Any:
        return {"callback": await _callbacks.click_to_call(sandbox, client(request), body)}

    async def user_status(request: Request, body: dict[str, Any]) -> Any:
        return {"callback": await _callbacks.user_status(sandbox, client(request), body)}

    async def account_url(request: Request, body: dict[str, Any]) -> Any:
        return {"callback": await _callbacks.account_url(sandbox, client(request), body)}

    async def activity(request: Request, body: dict[str, Any]) -> Any:
        system_url = f"{request.url.scheme}://{request.url.netloc}"
        return {"callback": await _callbacks.activity(sandbox, client(request), body, system_url)}

    return [
        Route("/_sandbox/state", _control(state), methods=["GET"]),
        Route("/_sandbox/reset", _control(reset), methods=["POST"]),
        Route("/_sandbox/seed", _control(seed), methods=["POST"]),
        Route("/_sandbox/faults", _control(faults), methods=["GET", "POST", "DELETE"]),
        Route("/_sandbox/settings", _control(settings), methods=["POST"]),
        Route("/_sandbox/callbacks/click-to-call", _control(click_to_call), methods=["POST"]),
        Route("/_sandbox/callbacks/user-status", _control(user_status), methods=["POST"]),
        Route("/_sandbox/callbacks/activity", _control(activity), methods=["POST"]),
        Route("/_sandbox/callbacks/account-url", _control(account_url), methods=["POST"]),
    ]


def _seed_from_keys(api_keys: Sequence[str], demo: bool) -> list[dict[str, Any]]:
    return [
        {"name": f"account-{i}", "api_key": key, "scopes": sorted(SCOPES), "demo": demo}
        for i, key in enumerate(api_keys, start=1)
    ]


def create_sandbox_app(
    *,
    api_keys: Sequence[str] = (),
    accounts: Sequence[dict[str, Any]] = (),
    demo_data: bool = False,
    config: SandboxConfig | None = None,
    rate_limit: bool | None = None,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], datetime] = _utc_now,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rng: random.Random | None = None,
    callback_transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """The sandbox as an ASGI app; ``app.state.sandbox`` is its :class:`Sandbox` engine."""
    config = config or SandboxConfig()
    if rate_limit is not None:
        config = dataclasses.replace(config, rate_limit=rate_limit)
    sandbox = Sandbox(
        config=config,
        seed=[*_seed_from_keys(api_keys, demo_data), *accounts],
        clock=clock,
        now=now,
        sleep=sleep,
        rng=rng,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.callback_timeout_seconds)
        async with httpx.AsyncClient(timeout=timeout, transport=callback_transport) as client:
            app.state.callback_client = client
            yield

    routes = [
        *_control_routes(sandbox),
        Route("/{path:path}", _api_route(sandbox), methods=_API_METHODS),
    ]
    app = _SandboxApp(sandbox, routes=routes, lifespan=lifespan)
    app.state.sandbox = sandbox
    return app
