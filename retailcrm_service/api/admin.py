"""Admin entry and JSON API under ``/retailcrm-admin/`` (the pages are in ``admin_pages``).

- ``GET /retailcrm-admin/login?token=<JWT>``: swaps a one-time login token (the CLI's link) or the
  module's account token (RetailCRM's ``accountUrl``) for an HttpOnly session cookie and redirects
  (303) to ``/retailcrm-admin/{n}/``, so the JWT does not stay in the address bar or history.
  ``POST /retailcrm-admin/login`` does the same, also accepting the form field ``clientId`` that
  RetailCRM posts to ``accountUrl`` (only while the enterprise is active and the integration
  enabled; unknown clientIds count against the caller's address like the callbacks' do). Each
  login opens a server-side session.
- ``POST /retailcrm-admin/logout``: ends the session on the server and clears the cookie.
- ``GET /retailcrm-admin/api/me``: the session's enterprise and its CSRF token.
- ``GET|PUT|DELETE /retailcrm-admin/api/config/{n}``, ``POST .../{n}/test``: the config API for
  the admin (the session cookie's path is ``/retailcrm-admin/``, so the UI calls these).
- ``POST /retailcrm-admin/api/register/{n}``: registers or updates the module in RetailCRM.
- ``GET|PUT /retailcrm-admin/api/managers/{n}``: RetailCRM users and internal numbers; save the
  mapping and push ``additionalCodes``.
- ``GET /retailcrm-admin/api/journal/{n}`` (filters, ``before`` cursor), ``GET .../calls/{n}/{id}``
  (one call's trace), ``POST .../replay/{n}`` (one event, one call, or failures since a time).
- ``GET /retailcrm-admin/api/diagnostics/{n}``.

Cookie-authenticated state-changing calls need ``X-CSRF-Token`` (``security.admin_auth``); bodies
must be ``application/json`` (415 otherwise).
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from retailcrm_service.api.callbacks import client_config
from retailcrm_service.api.config import check_number, config_body, test_body
from retailcrm_service.api.http import read_form, read_json, validate
from retailcrm_service.crm.connections import public_view
from retailcrm_service.errors import ApiError
from retailcrm_service.ops.diagnostics import enterprise_diagnostics
from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security import admin_auth as auth
from retailcrm_service.storage import config_writes as config_store
from retailcrm_service.storage import history

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"])

_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


async def _set_session(
    response: Response, runtime: Runtime, enterprise_number: str, version: int
) -> None:
    """Open a server-side session and put its token in the HttpOnly cookie."""
    ttl = runtime.settings.admin_session_ttl_seconds
    session_id = await auth.open_session(runtime.pool, enterprise_number, ttl_seconds=ttl)
    token = auth.issue_token(
        runtime.settings,
        enterprise_number,
        version=version,
        kind="session",
        ttl_seconds=ttl,
        session_id=session_id,
    )
    response.set_cookie(
        auth.SESSION_COOKIE,
        token,
        max_age=ttl,
        path=auth.COOKIE_PATH,
        httponly=True,
        secure=runtime.settings.public_base_url.startswith("https://"),
        samesite="lax",
    )


async def _login_response(runtime: Runtime, claims: auth.AdminClaims) -> Response:
    response = RedirectResponse(
        f"/retailcrm-admin/{claims.enterprise_number}/", status_code=303, headers=_NO_STORE
    )
    await _set_session(response, runtime, claims.enterprise_number, claims.version)
    logger.info("admin.login enterprise=%s via=%s", claims.enterprise_number, claims.kind)
    return response


async def _claims_from_link(runtime: Runtime, token: str) -> auth.AdminClaims:
    try:
        claims = await auth.check_claims(
            runtime.settings, runtime.pool, token, kinds=frozenset({"login", "account"})
        )
    except auth.TokenInvalid as exc:
        raise ApiError(401, "unauthorized", f"login link: {exc}", headers=_NO_STORE) from None
    if claims.kind == "login" and not await auth.burn_login(runtime.pool, claims):
        raise ApiError(401, "unauthorized", "login link already used", headers=_NO_STORE)
    return claims


@router.get("/retailcrm-admin/login")
async def login_link(request: Request, runtime: RuntimeDep) -> Response:
    token = request.query_params.get("token", "")
    if not token:
        raise ApiError(401, "unauthorized", "login link without a token", headers=_NO_STORE)
    return await _login_response(runtime, await _claims_from_link(runtime, token))


@router.post("/retailcrm-admin/login")
async def login_post(request: Request, runtime: RuntimeDep) -> Response:
    token = request.query_params.get("token", "")
    if token:
        return await _login_response(runtime, await _claims_from_link(runtime, token))
    form = await read_form(request, max_bytes=16 * 1024)
    try:
        config = await client_config(runtime, request, form.get("clientId"), "admin_login")
    except ApiError as exc:
        headers = {**(exc.headers or {}), **_NO_STORE}
        raise ApiError(exc.status, exc.code, exc.message, headers=headers) from None
    if not (config.active and config.enabled):
        # The module's clientId opens a session only while the integration is on, as it does
        # for the callbacks; an admin of a switched-off account uses a one-time link.
        raise ApiError(
            403, "disabled", "the RetailCRM integration is off for this account", headers=_NO_STORE
        )
    version = await auth.current_version(runtime.pool, config.enterprise_number)
    claims = auth.AdminClaims(config.enterprise_number, version, "account", "", 0)
    return await _login_response(runtime, claims)


@router.post("/retailcrm-admin/logout")
async def logout(request: Request, runtime: RuntimeDep) -> Response:
    """End the session on the server and clear the cookie.

    The page's script posts with ``X-CSRF-Token``; the no-script form posts the ``csrf_token``
    field and is redirected to the entry page. A session of someone else's cookie cannot be
    ended from another site: without the CSRF token the answer is 403.
    """
    form = _is_form(request)
    presented = request.headers.get(auth.CSRF_HEADER)
    if form:
        fields = await read_form(request, max_bytes=4 * 1024)
        value = fields.get(auth.CSRF_FIELD)
        presented = value if isinstance(value, str) else presented
    token = auth.presented_token(request)
    if token:
        try:
            claims = await auth.check_claims(
                runtime.settings, runtime.pool, token, kinds=frozenset({"session"})
            )
        except auth.TokenInvalid:
            claims = None
        if claims is not None:
            if not auth.bearer_token(request):
                auth.check_csrf(runtime.settings, claims, presented)
            if claims.session_id is not None:
                await auth.end_session(runtime.pool, claims.session_id)
            logger.info("admin.logout enterprise=%s", claims.enterprise_number)
    response: Response
    if form:
        response = RedirectResponse("/retailcrm-admin/", status_code=303, headers=_NO_STORE)
    else:
        response = JSONResponse({"logged_out": True}, headers=_NO_STORE)
    response.delete_cookie(auth.SESSION_COOKIE, path=auth.COOKIE_PATH)
    return response


def _is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return content_type == "application/x-www-form-urlencoded"


@router.get("/retailcrm-admin/api/me")
async def me(claims: auth.SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    return {
        "enterprise_number": claims.enterprise_number,
        "expires_at": claims.expires_at,
        "csrf_token": auth.csrf_token(runtime.settings, claims),
    }


async def json_only(request: Request) -> None:
    """415 for a request body that is not ``application/json`` (a form post cannot reach us)."""
    has_body = request.headers.get("content-length", "0") not in ("", "0") or (
        "chunked" in request.headers.get("transfer-encoding", "")
    )
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if has_body and content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")


JSON_ONLY = [Depends(json_only)]


@router.get("/retailcrm-admin/api/config/{enterprise_number}")
async def admin_get_config(
    enterprise_number: str, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    return public_view(await runtime.connections.get(enterprise_number))


@router.put("/retailcrm-admin/api/config/{enterprise_number}", dependencies=JSON_ONLY)
async def admin_put_config(
    enterprise_number: str, request: Request, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    body = await config_body(request, runtime)
    return public_view(await runtime.connections.save(enterprise_number, body))


@router.post("/retailcrm-admin/api/config/{enterprise_number}/test", dependencies=JSON_ONLY)
async def admin_test_config(
    enterprise_number: str, request: Request, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    body = await test_body(request, runtime)
    return await runtime.connections.test(
        enterprise_number, domain=body.domain, api_key=body.api_key
    )


@router.delete("/retailcrm-admin/api/config/{enterprise_number}")
async def admin_delete_config(
    enterprise_number: str, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    return await runtime.connections.delete(enterprise_number)


@router.post("/retailcrm-admin/api/register/{enterprise_number}", dependencies=JSON_ONLY)
async def register(
    enterprise_number: str,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> Response:
    """Register (or update) the enterprise's telephony module in RetailCRM."""
    check_number(enterprise_number)
    ok, result = await runtime.connections.register(enterprise_number)
    if not ok:
        return JSONResponse(
            {
                "error": {
                    "code": "retailcrm_error",
                    "message": f"RetailCRM refused the module: {result['message']}",
                    "retailcrm": result,
                }
            },
            status_code=502,
        )
    return JSONResponse(
        {
            "enterprise_number": enterprise_number,
            "registered": True,
            "code": runtime.settings.module_code,
            "info": result.get("info", {}),
        }
    )


# -- managers, journal, replay, diagnostics ----------------------------------------------------


@router.get("/retailcrm-admin/api/managers/{enterprise_number}")
async def managers(enterprise_number: str, runtime: RuntimeDep, _: auth.AdminDep) -> dict[str, Any]:
    """RetailCRM's users, the internal numbers with their owners, both mappings and their diff."""
    check_number(enterprise_number)
    return await runtime.connections.managers(enterprise_number)


@router.put("/retailcrm-admin/api/managers/{enterprise_number}", dependencies=JSON_ONLY)
async def save_managers(
    enterprise_number: str, request: Request, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    """Save the whole mapping (one owner per number) and push ``additionalCodes``."""
    check_number(enterprise_number)
    body = validate(config_store.ExtensionsIn, await read_json(request, max_bytes=64 * 1024))
    return await runtime.connections.save_extensions(enterprise_number, body.user_extensions)


def journal_filter(request: Request) -> tuple[history.JournalFilter, int | None, int]:
    """The journal's query string: filters, the keyset cursor ``before`` and ``limit``."""
    q = request.query_params
    errors: dict[str, str] = {}

    def text(name: str, pattern: str) -> str | None:
        value = (q.get(name) or "").strip()
        if value and not re.fullmatch(pattern, value):
            errors[name] = "invalid value"
            return None
        return value or None

    def moment(name: str) -> datetime | None:
        value = (q.get(name) or "").strip()
        if not value:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            errors[name] = "an ISO-8601 date or time"
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    def number(name: str, default: int | None) -> int | None:
        value = (q.get(name) or "").strip()
        if not value:
            return default
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            errors[name] = "a positive integer"
            return default
        return int(value)

    f = history.JournalFilter(
        phone=text("phone", r"\+?[0-9]{2,20}"),
        call_id=text("call_id", r"[0-9A-Za-z._-]{1,64}"),
        event_type=text("event_type", r"[a-z_]{1,40}"),
        status=text("status", r"[a-z_]{1,20}"),
        since=moment("since"),
        until=moment("until"),
    )
    before = number("before", None)
    limit = number("limit", 50) or 50
    if errors:
        raise ApiError(422, "validation_error", "invalid journal filter", fields=errors)
    return f, before, min(limit, history.MAX_PAGE)


@router.get("/retailcrm-admin/api/journal/{enterprise_number}")
async def journal(
    enterprise_number: str, request: Request, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    """``integration_logs`` (``source=logs``, default) or the outbox (``source=outbox``),
    newest first; the next page is ``before=<next_before>``."""
    check_number(enterprise_number)
    f, before, limit = journal_filter(request)
    search = (
        history.search_outbox
        if request.query_params.get("source") == "outbox"
        else history.search_logs
    )
    rows = await search(runtime.pool, enterprise_number, f, before_id=before, limit=limit)
    return {
        "rows": rows,
        "next_before": rows[-1]["id"] if len(rows) == limit else None,
    }


@router.get("/retailcrm-admin/api/calls/{enterprise_number}/{call_id}")
async def call_trace(
    enterprise_number: str, call_id: str, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    if not re.fullmatch(r"[0-9A-Za-z._-]{1,64}", call_id):
        raise ApiError(422, "validation_error", "invalid call id", fields={"call_id": "invalid"})
    return await history.call_trace(runtime.pool, enterprise_number, call_id)


class ReplayIn(BaseModel):
    """One event (``id``), one call (``call_unique_id``) or every failure ``since`` a time."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = Field(default=None, ge=1)
    call_unique_id: str | None = Field(default=None, pattern=r"^[0-9A-Za-z._-]{1,64}$")
    since: AwareDatetime | None = None


@router.post("/retailcrm-admin/api/replay/{enterprise_number}", dependencies=JSON_ONLY)
async def replay(
    enterprise_number: str, request: Request, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    body = validate(ReplayIn, await read_json(request, max_bytes=4 * 1024))
    chosen = [v for v in (body.id, body.call_unique_id, body.since) if v is not None]
    if len(chosen) != 1:
        raise ApiError(422, "validation_error", "give exactly one of id, call_unique_id and since")
    result = await runtime.need_events().replay(
        enterprise_number=enterprise_number,
        event_id=body.id,
        call_unique_id=body.call_unique_id,
        since=body.since,
    )
    logger.info(
        "admin.replay enterprise=%s events=%d leased=%d",
        enterprise_number,
        result.replayed,
        result.leased,
    )
    return {
        "enterprise_number": enterprise_number,
        "replayed": result.replayed,
        "leased": result.leased,
    }


@router.get("/retailcrm-admin/api/diagnostics/{enterprise_number}")
async def diagnostics(
    enterprise_number: str, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    return await enterprise_diagnostics(
        enterprise_number,
        pool=runtime.pool,
        configs=runtime.configs,
        listener=runtime.listener,
        events=runtime.events,
        pacer=runtime.pacer,
    )
