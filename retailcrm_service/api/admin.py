"""Admin entry and JSON API under ``/retailcrm-admin/`` (the HTML pages come in a later issue).

- ``GET /retailcrm-admin/login?token=<JWT>``: swaps a one-time login token (the CLI's link) or the
  module's account token (RetailCRM's ``accountUrl``) for an HttpOnly session cookie and redirects
  (303) to ``/retailcrm-admin/{n}/``, so the JWT does not stay in the address bar or history.
  ``POST /retailcrm-admin/login`` does the same, also accepting the form field ``clientId`` that
  RetailCRM posts to ``accountUrl`` (only while the enterprise is active and the integration
  enabled; unknown clientIds count against the caller's address like the callbacks' do).
  ``POST /retailcrm-admin/logout`` clears the cookie.
- ``GET /retailcrm-admin/api/me``: the session's enterprise.
- ``GET|PUT|DELETE /retailcrm-admin/api/config/{n}``, ``POST .../{n}/test``: the config API for
  the admin (the session cookie's path is ``/retailcrm-admin/``, so the UI calls these).
- ``POST /retailcrm-admin/api/register/{n}``: registers or updates the module in RetailCRM.
- ``GET /retailcrm-admin/`` and ``/retailcrm-admin/{n}/``: placeholder pages.
"""

from __future__ import annotations

import html
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from retailcrm_service.api import config as config_routes
from retailcrm_service.api.callbacks import client_config
from retailcrm_service.api.http import read_form
from retailcrm_service.crm import integration_module as module
from retailcrm_service.errors import ApiError
from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security import admin_auth as auth
from retailcrm_service.storage import config_writes as config_store

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"])

_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _set_session(
    response: Response, runtime: Runtime, enterprise_number: str, version: int
) -> None:
    ttl = runtime.settings.admin_session_ttl_seconds
    token = auth.issue_token(
        runtime.settings, enterprise_number, version=version, kind="session", ttl_seconds=ttl
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
    _set_session(response, runtime, claims.enterprise_number, claims.version)
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
async def logout() -> Response:
    response = JSONResponse({"logged_out": True}, headers=_NO_STORE)
    response.delete_cookie(auth.SESSION_COOKIE, path=auth.COOKIE_PATH)
    return response


@router.get("/retailcrm-admin/api/me")
async def me(claims: auth.SessionDep) -> dict[str, Any]:
    return {"enterprise_number": claims.enterprise_number, "expires_at": claims.expires_at}


@router.get("/retailcrm-admin/api/config/{enterprise_number}")
async def admin_get_config(
    enterprise_number: str, runtime: RuntimeDep, claims: auth.AdminDep
) -> dict[str, Any]:
    return await config_routes.get_config(enterprise_number, runtime, claims)


@router.put("/retailcrm-admin/api/config/{enterprise_number}")
async def admin_put_config(
    enterprise_number: str, request: Request, runtime: RuntimeDep, claims: auth.AdminDep
) -> dict[str, Any]:
    return await config_routes.put_config(enterprise_number, request, runtime, claims)


@router.post("/retailcrm-admin/api/config/{enterprise_number}/test")
async def admin_test_config(
    enterprise_number: str, request: Request, runtime: RuntimeDep, claims: auth.AdminDep
) -> dict[str, Any]:
    return await config_routes.check_config_access(enterprise_number, request, runtime, claims)


@router.delete("/retailcrm-admin/api/config/{enterprise_number}")
async def admin_delete_config(
    enterprise_number: str, runtime: RuntimeDep, claims: auth.AdminDep
) -> dict[str, Any]:
    return await config_routes.delete_config(enterprise_number, runtime, claims)


@router.post("/retailcrm-admin/api/register/{enterprise_number}")
async def register(
    enterprise_number: str,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> Response:
    """Register (or update) the enterprise's telephony module in RetailCRM."""
    config_routes.check_number(enterprise_number)
    config = await config_routes.fresh_config(runtime, enterprise_number)
    if not config_routes.can_send_module(config):
        raise ApiError(
            409,
            "not_configured",
            config.api_key_error or "save a domain and API key before registering",
        )
    ok, result = await config_routes.send_module(
        runtime, config, active=True, event="register_module"
    )
    runtime.metrics.retailcrm_calls.labels("integration_module_edit", "ok" if ok else "error").inc()
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
    async with runtime.pool.acquire() as conn:
        await config_store.set_module_state(
            conn,
            enterprise_number,
            module.module_state(active=True, ok=True, code=runtime.settings.module_code),
        )
    await config_routes.refresh_cache(runtime, enterprise_number)
    logger.info("admin.module_registered enterprise=%s", enterprise_number)
    return JSONResponse(
        {
            "enterprise_number": enterprise_number,
            "registered": True,
            "code": runtime.settings.module_code,
            "info": result.get("info", {}),
        }
    )


_PAGE = """<!doctype html>
<html lang="ru"><head><meta charset="utf-8"><title>Vochi-CRM · RetailCRM</title>
<meta name="referrer" content="no-referrer"></head>
<body><img src="/retailcrm-admin/static/logo.svg" alt="" width="48">
<h1>Интеграция с RetailCRM</h1><p>{body}</p></body></html>"""


@router.get("/retailcrm-admin/", response_class=HTMLResponse)
async def admin_index() -> HTMLResponse:
    body = (
        "Откройте ссылку администратора, полученную командой <code>retailcrm-service token</code>."
    )
    return HTMLResponse(_PAGE.format(body=body), headers=_NO_STORE)


@router.get("/retailcrm-admin/{enterprise_number}/", response_class=HTMLResponse)
async def admin_enterprise_page(enterprise_number: str, _: auth.AdminDep) -> HTMLResponse:
    body = f"Предприятие {html.escape(enterprise_number)}: вход выполнен."
    return HTMLResponse(_PAGE.format(body=body), headers=_NO_STORE)
