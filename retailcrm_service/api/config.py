"""Config API and config-cache endpoints (README.md's routes), internal callers or the admin.

``GET|PUT|DELETE /api/config/{n}``, ``POST /api/config/{n}/test``,
``POST /api/config-cache/refresh/{n}``, ``POST /api/config-cache/refresh-all``,
``GET /api/config-cache/active-enterprises``. The API key (and the clientId) are only ever
returned masked (``***`` + last 4 chars).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from retailcrm_service.api.http import read_json, validate
from retailcrm_service.crm import integration_module as module
from retailcrm_service.crm.client import RetailCrmClient
from retailcrm_service.errors import ApiError
from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security import admin_auth as auth
from retailcrm_service.security.secrets import Secret
from retailcrm_service.storage import config_writes as config_store
from retailcrm_service.storage.enterprise_configs import RetailCrmConfig, load_config

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


def public_view(config: RetailCrmConfig) -> dict[str, Any]:
    """The config as any endpoint may show it: secrets masked."""
    configured = bool(config.domain) or config.api_key is not None
    return {
        "enterprise_number": config.enterprise_number,
        "configured": configured,
        "active": config.active,
        "enabled": config.enabled,
        "domain": config.domain or None,
        "api_key": config.api_key.masked if config.api_key is not None else None,
        "api_key_set": config.api_key is not None or config.api_key_error is not None,
        "api_key_error": config.api_key_error,
        "client_id": config.client_id.masked if config.client_id is not None else None,
        "user_extensions": dict(config.user_extensions),
        "timezone": config.timezone,
        "account_timezone": config.account_timezone,
        "internal_calls": config.internal_calls,
        "external_phones": [dict(p) for p in config.external_phones],
        "smart_redirect": dict(config.smart_redirect),
        "module": dict(config.module),
        "last_sync": config.last_sync,
        "is_on": config.is_on,
    }


async def fresh_config(runtime: Runtime, number: str) -> RetailCrmConfig:
    """The config straight from the database (404 when the enterprise does not exist)."""
    config = await load_config(runtime.pool, number, secret_key=runtime.settings.secret_key)
    if config is None:
        raise ApiError(404, "not_found", f"no enterprise {number}")
    return config


async def refresh_cache(runtime: Runtime, number: str) -> None:
    # NOTIFY does it too; refreshing here makes this instance read its own writes at once.
    try:
        await runtime.configs.refresh(number)
    except Exception as exc:
        logger.warning(
            "config.cache_refresh_failed enterprise=%s error=%s", number, type(exc).__name__
        )


@router.get("/api/config/{enterprise_number}")
async def get_config(
    enterprise_number: str,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    check_number(enterprise_number)
    return public_view(await fresh_config(runtime, enterprise_number))


@router.put("/api/config/{enterprise_number}")
async def put_config(
    enterprise_number: str,
    request: Request,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    check_number(enterprise_number)
    body = validate(
        config_store.ConfigIn,
        await read_json(request, max_bytes=256 * 1024),
        context={"allow_http": runtime.settings.allow_http},
    )
    try:
        async with runtime.pool.acquire() as conn:
            await config_store.save_config(
                conn, enterprise_number, body, secret_key=runtime.settings.secret_key
            )
    except config_store.NotFound:
        raise ApiError(404, "not_found", f"no enterprise {enterprise_number}") from None
    except config_store.ApiKeyRequired:
        raise ApiError(
            422,
            "validation_error",
            "an API key is required on the first save and when the domain changes",
            fields={"api_key": "required on the first save and with a new domain"},
        ) from None
    logger.info("config.saved enterprise=%s enabled=%s", enterprise_number, body.enabled)
    await refresh_cache(runtime, enterprise_number)
    return public_view(await fresh_config(runtime, enterprise_number))


@router.delete("/api/config/{enterprise_number}")
async def delete_config(
    enterprise_number: str,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    """Deactivate the module in RetailCRM, revoke admin tokens, remove the config."""
    check_number(enterprise_number)
    config = await fresh_config(runtime, enterprise_number)
    deactivated: bool | None = None
    retailcrm_error: dict[str, Any] | None = None
    if can_send_module(config):
        deactivated, result = await send_module(
            runtime, config, active=False, event="delete_module"
        )
        retailcrm_error = None if deactivated else result
    else:
        runtime.logs.write(
            enterprise_number,
            "delete_module",
            request_data={"domain": config.domain or None},
            response_data={"skipped": "no usable RetailCRM config"},
            status="success",
        )
    async with runtime.pool.acquire() as conn, conn.transaction():
        await auth.revoke_admin_tokens(conn, enterprise_number)
        removed = await config_store.remove_config(conn, enterprise_number)
    logger.info(
        "config.deleted enterprise=%s removed=%s module_deactivated=%s",
        enterprise_number,
        removed,
        deactivated,
    )
    await refresh_cache(runtime, enterprise_number)
    return {
        "enterprise_number": enterprise_number,
        "deleted": removed,
        "module_deactivated": deactivated,
        "retailcrm_error": retailcrm_error,
        "admin_tokens_revoked": True,
    }


def can_send_module(config: RetailCrmConfig) -> bool:
    """A domain, a readable API key and a clientId: what sending the module needs."""
    return config.api_key is not None and bool(config.domain) and config.client_id is not None


async def send_module(
    runtime: Runtime, config: RetailCrmConfig, *, active: bool, event: str
) -> tuple[bool, dict[str, Any]]:
    """Send the whole module (with a fresh account link) to RetailCRM, journalled as ``event``."""
    number = config.enterprise_number
    version = await auth.current_version(runtime.pool, number)
    payload = module.build_module(
        runtime.settings,
        config,
        account_url=auth.account_url(runtime.settings, number, version=version),
        active=active,
    )
    redact = [s.get_secret_value() for s in (config.api_key, config.client_id) if s is not None]
    return await module.edit_module(
        runtime.retailcrm(config),
        payload,
        logs=runtime.logs,
        enterprise_number=number,
        event_type=event,
        redact=redact,
    )


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


@router.post("/api/config/{enterprise_number}/test")
async def check_config_access(
    enterprise_number: str,
    request: Request,
    runtime: RuntimeDep,
    _: auth.InternalOrAdminDep,
) -> dict[str, Any]:
    """Call RetailCRM with the saved (or given) domain and key; report access or the error."""
    check_number(enterprise_number)
    raw = await read_json(request, max_bytes=16 * 1024) if await _has_body(request) else {}
    body = validate(TestIn, raw, context={"allow_http": runtime.settings.allow_http})
    config = await fresh_config(runtime, enterprise_number)
    domain = body.domain or config.domain
    key = Secret(body.api_key) if body.api_key else config.api_key
    if body.domain and body.domain != config.domain and not body.api_key:
        # The saved key goes only to the saved account: else any admin session could send it
        # (never shown in full) to an account or local port of their choosing.
        raise ApiError(
            422,
            "validation_error",
            "give the API key to test a domain other than the saved one",
            fields={"api_key": "required with a domain other than the saved one"},
        )
    if not domain or key is None:
        raise ApiError(
            422,
            "validation_error",
            "no domain and API key to test",
            fields={"api_key": config.api_key_error or "no API key saved or given"},
        )
    client = RetailCrmClient(
        domain=domain, api_key=key, http=runtime.http, timeout=runtime.settings.retailcrm_timeout
    )
    report = await module.check_access(client)
    runtime.logs.write(
        enterprise_number,
        "test_connection",
        request_data={"domain": domain},
        response_data=report,
        status="success" if report["ok"] else "error",
        error_message=None if report["ok"] else report["error"]["message"],
        redact=[key.get_secret_value()],
    )
    runtime.metrics.retailcrm_calls.labels("credentials", "ok" if report["ok"] else "error").inc()
    return {"enterprise_number": enterprise_number, "domain": domain, **report}


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
