"""Config API and config-cache endpoints (README.md's routes), internal callers or the admin.

``GET|PUT|DELETE /api/config/{n}``, ``POST /api/config/{n}/test``,
``POST /api/config-cache/refresh/{n}``, ``POST /api/config-cache/refresh-all``,
``GET /api/config-cache/active-enterprises``. The API key (and the clientId) are only ever
returned masked (``***`` + last 4 chars). The logic lives in ``crm.connections.Connections``
(``runtime.connections``); these routes parse, authorise, call it and shape the reply.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from retailcrm_service.api.http import read_json, validate
from retailcrm_service.crm.connections import public_view
from retailcrm_service.errors import ApiError
from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security import admin_auth as auth
from retailcrm_service.storage import config_writes as config_store

logger = logging.getLogger(__name__)

router = APIRouter(tags=["config"])

_NUMBER = re.compile(r"^[0-9A-Za-z_-]{1,32}$")


def check_number(enterprise_number: str) -> str:
    if not _NUMBER.fullmatch(enterprise_number):  # fullmatch: "$" also matches before a "\n"
        raise ApiError(
            422,
            "validation_error",
            "invalid enterprise number",
            fields={"enterprise_number": "letters, digits, '-' or '_' (1-32)"},
        )
    return enterprise_number


@router.get("/api/config/{enterprise_number}")
async def get_config(
    enterprise_number: str,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    check_number(enterprise_number)
    return public_view(await runtime.connections.get(enterprise_number))


async def config_body(request: Request, runtime: Runtime) -> config_store.ConfigIn:
    """The validated body of a config PUT (shared by the admin route of the same PUT)."""
    return validate(
        config_store.ConfigIn,
        await read_json(request, max_bytes=256 * 1024),
        context={"allow_http": runtime.settings.allow_http},
    )


@router.put("/api/config/{enterprise_number}")
async def put_config(
    enterprise_number: str,
    request: Request,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    check_number(enterprise_number)
    body = await config_body(request, runtime)
    return public_view(await runtime.connections.save(enterprise_number, body))


@router.delete("/api/config/{enterprise_number}")
async def delete_config(
    enterprise_number: str,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    """Deactivate the module in RetailCRM, revoke admin tokens, remove the config."""
    check_number(enterprise_number)
    return await runtime.connections.delete(enterprise_number)


class TestIn(BaseModel):
    """Optional body of the test: check a domain + key before saving them."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    domain: str | None = None
    api_key: str | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        allow_http = bool((info.context or {}).get("allow_http", False))
        return config_store.validate_domain(value, allow_http=allow_http)

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return config_store.normalize_api_key(value)


async def test_body(request: Request, runtime: Runtime) -> TestIn:
    """The validated (optional) body of a config test."""
    raw = await read_json(request, max_bytes=16 * 1024) if await _has_body(request) else {}
    return validate(TestIn, raw, context={"allow_http": runtime.settings.allow_http})


@router.post("/api/config/{enterprise_number}/test")
async def check_config_access(
    enterprise_number: str,
    request: Request,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    """Call RetailCRM with the saved (or given) domain and key; report access or the error."""
    check_number(enterprise_number)
    body = await test_body(request, runtime)
    return await runtime.connections.test(
        enterprise_number, domain=body.domain, api_key=body.api_key
    )


async def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return bool(length and length != "0") or "chunked" in request.headers.get(
        "transfer-encoding", ""
    )


# -- config cache -------------------------------------------------------------------------------


@router.post(
    "/api/config-cache/refresh/{enterprise_number}", dependencies=[Depends(auth.require_internal)]
)
async def cache_refresh(enterprise_number: str, runtime: RuntimeDep) -> dict[str, Any]:
    check_number(enterprise_number)
    try:
        config = await runtime.configs.refresh(enterprise_number)
    except Exception as exc:
        raise ApiError(503, "load_failed", f"reload failed: {type(exc).__name__}") from None
    return {
        "enterprise_number": enterprise_number,
        "exists": config is not None,
        "configured": config is not None and bool(config.domain),
        "is_on": config is not None and config.is_on,
    }


@router.post("/api/config-cache/refresh-all", dependencies=[Depends(auth.require_internal)])
async def cache_refresh_all(runtime: RuntimeDep) -> dict[str, Any]:
    try:
        count = await runtime.configs.refresh_all()
    except Exception as exc:
        raise ApiError(503, "load_failed", f"reload failed: {type(exc).__name__}") from None
    return {"enterprises": count, "active": len(runtime.configs.active_enterprises())}


@router.get("/api/config-cache/active-enterprises", dependencies=[Depends(auth.require_internal)])
async def cache_active(runtime: RuntimeDep) -> dict[str, Any]:
    active = runtime.configs.active_enterprises()
    return {"enterprises": active, "count": len(active)}
