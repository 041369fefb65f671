"""The admin's HTML pages (Russian), server-rendered with Jinja2 from ``templates/``.

- ``GET /retailcrm-admin/``: the entry page (how to log in; after logout or deletion);
- ``GET /retailcrm-admin/{n}/``: «Подключение» (domain, key status, options, test/save/delete);
- ``GET /retailcrm-admin/{n}/managers``: «Менеджеры» (RetailCRM users <-> internal numbers);
- ``GET /retailcrm-admin/{n}/journal``: «Журнал» (filters in the query string, keyset pages);
- ``GET /retailcrm-admin/{n}/journal/calls/{call_id}``: one call's trace;
- ``GET /retailcrm-admin/{n}/diagnostics``: «Диагностика».

Every page reads without JavaScript; ``static/admin.js`` does the saving through the JSON API
with the session's CSRF token (from ``<meta name="csrf-token">``). A page never carries an API
key, the JWT or the clientId: the key is shown as its last 4 characters only.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from retailcrm_service.api.admin import journal_filter
from retailcrm_service.api.config import check_number
from retailcrm_service.crm.connections import public_view
from retailcrm_service.errors import ApiError
from retailcrm_service.ops.diagnostics import enterprise_diagnostics
from retailcrm_service.runtime import RuntimeDep
from retailcrm_service.security import admin_auth as auth
from retailcrm_service.storage import history

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin-pages"])

_NO_STORE = {"Cache-Control": "no-store"}

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(resources.files("retailcrm_service") / "templates")),
    autoescape=True,
    undefined=jinja2.ChainableUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: Any) -> str:
    """An ISO time as admins read it: ``30.11.2026 20:39:44 UTC`` (the input when unparseable)."""
    if not isinstance(value, str) or not value:
        return "—"
    try:
        moment = datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return value
    return moment.strftime("%d.%m.%Y %H:%M:%S UTC")


_templates.filters["when"] = _when

TIMEZONES = (
    "Europe/Minsk",
    "Europe/Moscow",
    "Europe/Kaliningrad",
    "Europe/Samara",
    "Europe/Kyiv",
    "Europe/Warsaw",
    "Europe/Vilnius",
    "Europe/Riga",
    "Asia/Yekaterinburg",
    "Asia/Omsk",
    "Asia/Novosibirsk",
    "Asia/Krasnoyarsk",
    "Asia/Irkutsk",
    "Asia/Vladivostok",
    "Asia/Almaty",
    "Asia/Tashkent",
    "UTC",
)

STATE_NAMES = {
    "pending": "ожидает",
    "delivered": "доставлено",
    "expired": "устарело",
    "superseded": "заменено",
    "dead": "не доставлено",
    "skipped": "пропущено",
    "success": "успех",
    "error": "ошибка",
}


def render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(template).render(states=STATE_NAMES, **context)
    return HTMLResponse(html, status_code=status, headers=_NO_STORE)


async def _session(request: Request, number: str) -> auth.AdminClaims | HTMLResponse:
    """The admin's claims for ``number``, or the page saying why not (401/403)."""
    try:
        check_number(number)
        return await auth.require_admin(request, number)
    except ApiError as exc:
        if "text/html" not in request.headers.get("accept", ""):
            raise  # an API client (not a browser) gets the JSON error
        message = (
            "Сессия истекла или вы вышли. Откройте личный кабинет из RetailCRM "
            "или новую ссылку администратора."
            if exc.status == 401
            else "Эта страница принадлежит другому предприятию."
            if exc.status == 403
            else "Неверный адрес страницы."
        )
        return render("entry.html", status=exc.status, message=message)


def _page(
    request: Request, runtime: Any, claims: auth.AdminClaims, section: str, title: str
) -> dict[str, Any]:
    number = claims.enterprise_number
    return {
        "number": number,
        "section": section,
        "title": title,
        "csrf": auth.csrf_token(runtime.settings, claims),
        "base": f"/retailcrm-admin/{number}",
    }


@router.get("/retailcrm-admin/", response_class=HTMLResponse)
async def admin_index(request: Request) -> HTMLResponse:
    notices = {
        "logged_out": "Вы вышли из личного кабинета.",
        "deleted": "Интеграция удалена, ссылки входа отозваны.",
    }
    notice = next((text for key, text in notices.items() if key in request.query_params), None)
    return render(
        "entry.html",
        message=notice
        or "Откройте личный кабинет из RetailCRM («Перейти в личный кабинет») "
        "или ссылку администратора (команда retailcrm-service token).",
    )


@router.get("/retailcrm-admin/{enterprise_number}/", response_class=HTMLResponse)
async def connection_page(
    enterprise_number: str, request: Request, runtime: RuntimeDep
) -> HTMLResponse:
    claims = await _session(request, enterprise_number)
    if isinstance(claims, HTMLResponse):
        return claims
    config = public_view(await runtime.connections.get(enterprise_number))
    key = config["api_key"]
    outcomes = await history.last_outcomes(runtime.pool, enterprise_number, limit=1)
    return render(
        "connection.html",
        **_page(request, runtime, claims, "connection", "Подключение"),
        config=config,
        key_tail=key[-4:] if isinstance(key, str) and len(key) >= 4 else None,
        timezones=TIMEZONES,
        last_test=outcomes["last_test"],
    )


@router.get("/retailcrm-admin/{enterprise_number}/managers", response_class=HTMLResponse)
async def managers_page(
    enterprise_number: str, request: Request, runtime: RuntimeDep
) -> HTMLResponse:
    claims = await _session(request, enterprise_number)
    if isinstance(claims, HTMLResponse):
        return claims
    data: dict[str, Any] | None = None
    problem: str | None = None
    try:
        data = await runtime.connections.managers(enterprise_number)
    except ApiError as exc:
        problem = (
            "Сначала сохраните подключение к RetailCRM."
            if exc.status == 409
            else f"Не удалось загрузить менеджеров: {exc.message}"
        )
    owners: dict[str, str] = {}
    if data is not None:
        names = {u["id"]: u["name"] for u in data["users"]}
        owners = {ext: names.get(uid, f"#{uid}") for uid, ext in data["user_extensions"].items()}
    return render(
        "managers.html",
        **_page(request, runtime, claims, "managers", "Менеджеры"),
        data=data,
        problem=problem,
        owners=owners,
    )


@router.get("/retailcrm-admin/{enterprise_number}/journal", response_class=HTMLResponse)
async def journal_page(
    enterprise_number: str, request: Request, runtime: RuntimeDep
) -> HTMLResponse:
    claims = await _session(request, enterprise_number)
    if isinstance(claims, HTMLResponse):
        return claims
    source = "outbox" if request.query_params.get("source") == "outbox" else "logs"
    problem: str | None = None
    rows: list[dict[str, Any]] = []
    next_before: int | None = None
    try:
        f, before, limit = journal_filter(request)
        search = history.search_outbox if source == "outbox" else history.search_logs
        rows = await search(runtime.pool, enterprise_number, f, before_id=before, limit=limit)
        next_before = rows[-1]["id"] if len(rows) == limit else None
    except ApiError as exc:
        problem = "Неверный фильтр: " + ", ".join(sorted((exc.fields or {}).keys()))
    query = {
        k: request.query_params.get(k, "")
        for k in ("phone", "call_id", "event_type", "status", "since", "until")
    }
    return render(
        "journal.html",
        **_page(request, runtime, claims, "journal", "Журнал"),
        source=source,
        rows=rows,
        next_before=next_before,
        query=query,
        problem=problem,
    )


@router.get(
    "/retailcrm-admin/{enterprise_number}/journal/calls/{call_id}", response_class=HTMLResponse
)
async def call_page(
    enterprise_number: str, call_id: str, request: Request, runtime: RuntimeDep
) -> HTMLResponse:
    claims = await _session(request, enterprise_number)
    if isinstance(claims, HTMLResponse):
        return claims
    trace = await history.call_trace(runtime.pool, enterprise_number, call_id[:64])
    return render(
        "call.html",
        **_page(request, runtime, claims, "journal", f"Звонок {call_id[:64]}"),
        trace=trace,
    )


@router.get("/retailcrm-admin/{enterprise_number}/diagnostics", response_class=HTMLResponse)
async def diagnostics_page(
    enterprise_number: str, request: Request, runtime: RuntimeDep
) -> HTMLResponse:
    claims = await _session(request, enterprise_number)
    if isinstance(claims, HTMLResponse):
        return claims
    diag = await enterprise_diagnostics(
        enterprise_number,
        pool=runtime.pool,
        configs=runtime.configs,
        listener=runtime.listener,
        events=runtime.events,
        pacer=runtime.pacer,
    )
    return render(
        "diagnostics.html", **_page(request, runtime, claims, "diagnostics", "Диагностика"), d=diag
    )
