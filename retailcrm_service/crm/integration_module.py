"""The RetailCRM integration module of an enterprise: build it, register it, deactivate it.

``build_module(settings, config, *, account_url, active=True)`` returns the ``integrationModule``
object (docs/retailcrm.md#integration-module: code, integrationCode, active, name, SVG logo
served by this service, baseUrl, clientId, accountUrl, ``integrations.telephony`` with makeCallUrl,
changeUserStatusUrl, allowEdit=false, the three event flags (``config.events``), additionalCodes
from ``user_extensions`` and externalPhones). ``edit_module`` sends it through
``integration-modules/{code}/edit`` and writes the caller's ``register_module`` or
``delete_module`` row of ``integration_logs``. ``check_access`` is the config test
(``POST /api/config/{n}/test``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from retailcrm_service.crm.client import (
    RetailCrmApiError,
    RetailCrmAuthError,
    RetailCrmClient,
    RetailCrmError,
    RetailCrmRateLimited,
)
from retailcrm_service.settings import Settings
from retailcrm_service.storage.enterprise_configs import RetailCrmConfig
from retailcrm_service.storage.journal import IntegrationLogWriter

logger = logging.getLogger(__name__)

LOGO_PATH = "/retailcrm-admin/static/logo.svg"
MAKE_CALL_PATH = "/retailcrm/make-call"
USER_STATUS_PATH = "/retailcrm/status"


def build_module(
    settings: Settings, config: RetailCrmConfig, *, account_url: str, active: bool = True
) -> dict[str, Any]:
    """The full module object (RetailCRM may replace rather than merge: always send it all)."""
    if config.client_id is None:
        raise ValueError("the config has no clientId")
    base = settings.public_base_url
    additional_codes = [
        {"userId": int(user_id), "code": ext}
        for user_id, ext in sorted(config.extension_by_user.items(), key=lambda kv: int(kv[0]))
    ]
    return {
        "code": settings.module_code,
        "integrationCode": settings.module_code,
        "active": active,
        "name": settings.module_name,
        "logo": base + LOGO_PATH,
        "baseUrl": base,
        "clientId": config.client_id.get_secret_value(),
        "accountUrl": account_url,
        "integrations": {
            "telephony": {
                "makeCallUrl": base + MAKE_CALL_PATH,
                "changeUserStatusUrl": base + USER_STATUS_PATH,
                "allowEdit": False,
                "inputEventSupported": config.events.get("incoming_popups", True),
                "outputEventSupported": config.events.get("outgoing_popups", True),
                "hangupEventSupported": config.events.get("call_history", True),
                "additionalCodes": additional_codes,
                "externalPhones": [
                    {"siteCode": p["siteCode"], "externalPhone": p["externalPhone"]}
                    for p in config.external_phones
                    if "siteCode" in p and "externalPhone" in p
                ],
            }
        },
    }


def describe_error(exc: RetailCrmError) -> dict[str, Any]:
    """A precise, secret-free account of a RetailCRM failure for API responses and logs."""
    kind = (
        "auth"
        if isinstance(exc, RetailCrmAuthError)
        else "rate_limited"
        if isinstance(exc, RetailCrmRateLimited)
        else "api"
        if isinstance(exc, RetailCrmApiError)
        else "unavailable"
    )
    out: dict[str, Any] = {"kind": kind, "status": exc.status, "message": exc.message}
    if isinstance(exc, RetailCrmApiError) and exc.errors:
        out["errors"] = exc.errors
    if isinstance(exc, RetailCrmRateLimited) and exc.retry_after is not None:
        out["retry_after"] = exc.retry_after
    return out


async def edit_module(
    client: RetailCrmClient,
    module: dict[str, Any],
    *,
    logs: IntegrationLogWriter,
    enterprise_number: str,
    event_type: str,
    redact: list[str],
) -> tuple[bool, dict[str, Any]]:
    """Send the module; log the outcome; returns (ok, response-or-error description)."""
    try:
        body = await client.edit_integration_module(module)
    except RetailCrmError as exc:
        error = describe_error(exc)
        logs.write(
            enterprise_number,
            event_type,
            request_data={"integrationModule": module},
            response_data=error,
            status="error",
            error_message=exc.message,
            redact=redact,
        )
        logger.info(
            "module.edit_failed enterprise=%s event=%s kind=%s status=%s",
            enterprise_number,
            event_type,
            error["kind"],
            exc.status,
        )
        return False, error
    response = {k: v for k, v in body.items() if k != "success"}
    logs.write(
        enterprise_number,
        event_type,
        request_data={"integrationModule": module},
        response_data=response,
        status="success",
        redact=redact,
    )
    return True, response


async def check_access(client: RetailCrmClient) -> dict[str, Any]:
    """What the key may do, or the precise error (never raises for RetailCRM failures)."""
    try:
        try:
            body = await client.credentials()
        except RetailCrmApiError as exc:
            if exc.status != 404 or isinstance(exc, RetailCrmAuthError):
                raise
            versions = await client.api_versions()  # accounts without /api/credentials
            return {"ok": True, "versions": versions.get("versions", []), "credentials": None}
    except RetailCrmError as exc:
        return {"ok": False, "error": describe_error(exc)}
    scopes = [str(s) for s in body.get("scopes") or []]
    methods = [str(m) for m in body.get("credentials") or []]
    telephony = "telephony_write" in scopes or any("/telephony/" in m for m in methods)
    integration = "integration_write" in scopes or any("integration-modules" in m for m in methods)
    return {
        "ok": True,
        "scopes": scopes,
        "credentials": methods,
        "site_access": body.get("siteAccess"),
        "sites_available": body.get("sitesAvailable") or [],
        "telephony_access": telephony,
        "integration_access": integration,
    }


def module_state(*, active: bool, ok: bool, code: str) -> dict[str, Any]:
    return {
        "code": code,
        "active": active,
        "registered": ok,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
