"""Admin entry and JSON API under ``/retailcrm-admin/`` (the HTML pages come in a later issue).

- ``GET /retailcrm-admin/login?token=<JWT>``: swaps a one-time login token (the CLI's link) or the
  module's account token (RetailCRM's ``accountUrl``) for an HttpOnly session cookie and redirects
  (303) to ``/retailcrm-admin/{n}/``, so the JWT does not stay in the address bar or history.
  ``POST /retailcrm-admin/login`` does the same, also accepting the form field ``clientId`` that
  RetailCRM posts to ``accountUrl``. ``POST /retailcrm-admin/logout`` clears the cookie.
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

from retailcrm_service.api.config import check_number, config_body, test_body
from retailcrm_service.api.http import read_form
from retailcrm_service.crm.connections import public_view
from retailcrm_service.errors import ApiError
from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security import admin_auth as auth

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
    client_id = form.get("clientId")
    config = (
        await runtime.configs.find_by_client_id(client_id) if isinstance(client_id, str) else None
    )
    if config is None:
        raise ApiError(401, "unauthorized", "unknown clientId", headers=_NO_STORE)
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
    enterprise_number: str, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    return public_view(await runtime.connections.get(enterprise_number))


@router.put("/retailcrm-admin/api/config/{enterprise_number}")
async def admin_put_config(
    enterprise_number: str, request: Request, runtime: RuntimeDep, _: auth.AdminDep
) -> dict[str, Any]:
    check_number(enterprise_number)
    body = await config_body(request, runtime)
    return public_view(await runtime.connections.save(enterprise_number, body))


@router.post("/retailcrm-admin/api/config/{enterprise_number}/test")
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


@router.post("/retailcrm-admin/api/register/{enterprise_number}")
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
