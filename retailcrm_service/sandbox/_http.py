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

from retailcrm_service.sandbox import _callbacks
from retailcrm_service.sandbox._config import SCOPES, SandboxConfig
from retailcrm_service.sandbox._core import Incoming, Outgoing, Sandbox, _utc_now
from retailcrm_service.sandbox._errors import INPUT_ERRORS, ApiError, ControlError

_API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Response(text, status_code=status, media_type="application/json", headers=headers)


async def _form_pairs(request: Request) -> tuple[list[tuple[str, str]], str]:
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        body = (await request.body()).decode("utf-8", errors="replace")
        return parse_qsl(body, keep_blank_values=True), content_type
    if kind == "multipart/form-data":
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
    return [], content_type  # JSON bodies are not read by RetailCRM (docs/retailcrm.md#errors)


def _render(response: Outgoing) -> Response:
    if response.html is not None:
        return HTMLResponse(response.html, status_code=response.status, headers=response.headers)
    return _json(response.status, response.body, response.headers)


def _api_route(sandbox: Sandbox) -> Callable[[Request], Awaitable[Response]]:
    async def api(request: Request) -> Response:
        try:
            form, content_type = await _form_pairs(request)
        except ApiError as exc:
            return _json(exc.status, exc.body())
        incoming = Incoming(
            method=request.method,
            path=request.url.path,
            query=parse_qsl(request.url.query, keep_blank_values=True),
            form=form,
            header_key=request.headers.get("x-api-key"),
            base_url=f"{request.url.scheme}://{request.url.netloc}",
            content_type=content_type,
        )
        return _render(await sandbox.handle(incoming))

    return api


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
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.sandbox = sandbox
    return app
