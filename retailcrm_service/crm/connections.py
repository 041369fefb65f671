"""An enterprise's connection to RetailCRM: read, save, test, delete, register, push codes.

``Connections`` owns the business logic behind the config API (``/api/config/...``) and the
admin's JSON API (``/retailcrm-admin/api/...``); both route modules only parse, authorise, call
one method and shape the reply. Every call to RetailCRM is journaled (``integration_logs``) with
the API key and the clientId redacted, and every write refreshes this instance's config cache so
it reads its own writes at once (the ``NOTIFY`` reaches the other instances).

- ``get(n)``: the config straight from the database (404 when the enterprise does not exist);
- ``save(n, body)``: merge a validated ``ConfigIn`` (422 when a key is needed);
- ``test(n, domain=, api_key=)``: what the saved or given key may do, or the exact failure;
- ``delete(n)``: deactivate the module, revoke admin tokens, remove the config;
- ``register(n)``: send the module (active) and record its state;
- ``save_extensions(n, mapping)``: write ``user_extensions`` in one transaction, then push the
  module's ``additionalCodes``; the local write stands even when RetailCRM refuses;
- ``remote_codes(n)``: the ``additionalCodes`` RetailCRM holds now.

``public_view(config)`` is the config as any endpoint may show it: secrets masked.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from retailcrm_service.crm import integration_module as module
from retailcrm_service.crm.client import CrmHttpClient, RetailCrmClient, RetailCrmError
from retailcrm_service.errors import ApiError
from retailcrm_service.ops.metrics import Metrics
from retailcrm_service.security import admin_auth as auth
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings
from retailcrm_service.storage import config_writes as config_store
from retailcrm_service.storage.enterprise_configs import ConfigCache, RetailCrmConfig, load_config
from retailcrm_service.storage.journal import IntegrationLogWriter

logger = logging.getLogger(__name__)


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
        "events": dict(config.events),
        "last_sync": config.last_sync,
        "is_on": config.is_on,
    }


def can_send_module(config: RetailCrmConfig) -> bool:
    """A domain, a readable API key and a clientId: what sending the module needs."""
    return config.api_key is not None and bool(config.domain) and config.client_id is not None


class Connections:
    """The enterprise <-> RetailCRM connection, one journaled operation per method."""

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        pool: asyncpg.Pool,
        http: CrmHttpClient,
        journal: IntegrationLogWriter,
        configs: ConfigCache,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._pool = pool
        self._http = http
        self._journal = journal
        self._configs = configs

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, number: str) -> RetailCrmConfig:
        """The config straight from the database (404 when the enterprise does not exist)."""
        config = await load_config(self._pool, number, secret_key=self._settings.secret_key)
        if config is None:
            raise ApiError(404, "not_found", f"no enterprise {number}")
        return config

    def client(self, config: RetailCrmConfig) -> RetailCrmClient:
        """A client for the enterprise's saved account (409 when it has no usable config)."""
        if config.api_key is None or not config.domain:
            raise ApiError(
                409,
                "not_configured",
                config.api_key_error or "save a domain and API key first",
            )
        return RetailCrmClient(
            domain=config.domain,
            api_key=config.api_key,
            http=self._http,
            timeout=self._settings.retailcrm_timeout,
        )

    async def remote_codes(self, config: RetailCrmConfig) -> dict[str, Any]:
        """``{"ok": True, "codes": {user id: code}}`` as RetailCRM holds them, or the error."""
        try:
            data = await self.client(config).get_integration_module(self._settings.module_code)
        except RetailCrmError as exc:
            return {"ok": False, "error": module.describe_error(exc)}
        telephony = (data.get("integrations") or {}).get("telephony") or {}
        codes: dict[str, str] = {}
        for item in telephony.get("additionalCodes") or []:
            if isinstance(item, dict) and item.get("userId") is not None and item.get("code"):
                codes[str(item["userId"])] = str(item["code"])
        return {"ok": True, "codes": codes, "registered": bool(data)}

    # -- writes --------------------------------------------------------------------------------

    async def save(self, number: str, body: config_store.ConfigIn) -> RetailCrmConfig:
        try:
            async with self._pool.acquire() as conn:
                await config_store.save_config(
                    conn, number, body, secret_key=self._settings.secret_key
                )
        except config_store.NotFound:
            raise ApiError(404, "not_found", f"no enterprise {number}") from None
        except config_store.ApiKeyRequired:
            raise ApiError(
                422,
                "validation_error",
                "an API key is required on the first save and when the domain changes",
                fields={"api_key": "required on the first save and with a new domain"},
            ) from None
        logger.info("config.saved enterprise=%s enabled=%s", number, body.enabled)
        await self.refresh_cache(number)
        return await self.get(number)

    async def test(
        self, number: str, *, domain: str | None = None, api_key: str | None = None
    ) -> dict[str, Any]:
        """Call RetailCRM with the saved (or given) domain and key; report access or the error."""
        config = await self.get(number)
        target = domain or config.domain
        key = Secret(api_key) if api_key else config.api_key
        if domain and domain != config.domain and not api_key:
            # The saved key goes only to the saved account: else any admin session could send it
            # (never shown in full) to an account or local port of their choosing.
            raise ApiError(
                422,
                "validation_error",
                "give the API key to test a domain other than the saved one",
                fields={"api_key": "required with a domain other than the saved one"},
            )
        if not target or key is None:
            raise ApiError(
                422,
                "validation_error",
                "no domain and API key to test",
                fields={"api_key": config.api_key_error or "no API key saved or given"},
            )
        client = RetailCrmClient(
            domain=target, api_key=key, http=self._http, timeout=self._settings.retailcrm_timeout
        )
        report = await module.check_access(client)
        self._journal.write(
            number,
            "test_connection",
            request_data={"domain": target},
            response_data=report,
            status="success" if report["ok"] else "error",
            error_message=None if report["ok"] else report["error"]["message"],
            redact=[key.get_secret_value()],
        )
        outcome = "ok" if report["ok"] else "error"
        self._metrics.retailcrm_calls.labels("credentials", outcome).inc()
        return {"enterprise_number": number, "domain": target, **report}

    async def delete(self, number: str) -> dict[str, Any]:
        """Deactivate the module in RetailCRM, revoke admin tokens, remove the config."""
        config = await self.get(number)
        deactivated: bool | None = None
        retailcrm_error: dict[str, Any] | None = None
        if can_send_module(config):
            deactivated, result = await self._send_module(
                config, active=False, event="delete_module"
            )
            retailcrm_error = None if deactivated else result
        else:
            self._journal.write(
                number,
                "delete_module",
                request_data={"domain": config.domain or None},
                response_data={"skipped": "no usable RetailCRM config"},
                status="success",
            )
        async with self._pool.acquire() as conn, conn.transaction():
            await auth.revoke_admin_tokens(conn, number)
            removed = await config_store.remove_config(conn, number)
        logger.info(
            "config.deleted enterprise=%s removed=%s module_deactivated=%s",
            number,
            removed,
            deactivated,
        )
        await self.refresh_cache(number)
        return {
            "enterprise_number": number,
            "deleted": removed,
            "module_deactivated": deactivated,
            "retailcrm_error": retailcrm_error,
            "admin_tokens_revoked": True,
        }

    async def register(self, number: str) -> tuple[bool, dict[str, Any]]:
        """Register (or update) the module; (ok, RetailCRM's answer or the error described)."""
        config = await self.get(number)
        if not can_send_module(config):
            raise ApiError(
                409,
                "not_configured",
                config.api_key_error or "save a domain and API key before registering",
            )
        ok, result = await self._send_module(config, active=True, event="register_module")
        self._metrics.retailcrm_calls.labels(
            "integration_module_edit", "ok" if ok else "error"
        ).inc()
        if ok:
            await self._set_module_state(number, active=True, ok=True)
            logger.info("connections.module_registered enterprise=%s", number)
        return ok, result

    async def save_extensions(
        self, number: str, extensions: dict[str, str | None]
    ) -> dict[str, Any]:
        """Write the managers' extensions (one transaction), then push ``additionalCodes``.

        ``extensions`` is already validated (``config_writes.validate_user_extensions``); every
        extension must be one of the enterprise's internal numbers. The local mapping is the
        source of truth: it is saved even when RetailCRM then refuses the module, and the answer
        says so (``pushed: false`` with RetailCRM's error).
        """
        known = set(await self.internal_numbers(number))
        unknown = sorted({e for e in extensions.values() if e and e not in known})
        if unknown:
            raise ApiError(
                422,
                "validation_error",
                f"not an internal number of enterprise {number}: {', '.join(unknown)}",
                fields={"user_extensions": "only the enterprise's internal numbers"},
            )
        assigned: dict[str, str | None] = {uid: ext for uid, ext in extensions.items() if ext}
        async with self._pool.acquire() as conn:
            if not await config_store.set_user_extensions(conn, number, assigned):
                raise ApiError(409, "not_configured", "save the connection first")
        logger.info(
            "connections.extensions_saved enterprise=%s assigned=%d",
            number,
            len(assigned),
        )
        await self.refresh_cache(number)
        config = await self.get(number)
        pushed: bool | None = None
        retailcrm_error: dict[str, Any] | None = None
        if can_send_module(config):
            pushed, result = await self._send_module(config, active=True, event="push_codes")
            retailcrm_error = None if pushed else result
            self._metrics.retailcrm_calls.labels(
                "integration_module_edit", "ok" if pushed else "error"
            ).inc()
        return {
            "enterprise_number": number,
            "saved": True,
            "user_extensions": config.extension_by_user,
            "pushed": pushed,
            "retailcrm_error": retailcrm_error,
        }

    async def managers(self, number: str) -> dict[str, Any]:
        """RetailCRM's users, the enterprise's internal numbers with their platform owners, the
        local mapping, RetailCRM's ``additionalCodes`` and where the two differ."""
        config = await self.get(number)
        client = self.client(config)
        users: list[dict[str, Any]] = []
        users_error: dict[str, Any] | None = None
        try:
            users = [_user_view(u) for u in await _all_users(client)]
        except RetailCrmError as exc:
            users_error = module.describe_error(exc)
        remote = await self.remote_codes(config)
        local = config.extension_by_user
        remote_codes: dict[str, str] = remote.get("codes", {}) if remote["ok"] else {}
        differences = [
            {"user_id": uid, "local": local.get(uid), "remote": remote_codes.get(uid)}
            for uid in sorted(set(local) | set(remote_codes), key=int)
            if local.get(uid) != remote_codes.get(uid)
        ]
        return {
            "enterprise_number": number,
            "users": users,
            "users_error": users_error,
            "numbers": await self.numbers_with_owners(number),
            "user_extensions": local,
            "remote": remote,
            "differences": differences if remote["ok"] else [],
            "import_offered": not local and bool(remote_codes),
        }

    async def numbers_with_owners(self, number: str) -> list[dict[str, str]]:
        """The enterprise's internal numbers, each with its owner on the platform («150 — …»)."""
        rows = await self._pool.fetch(
            """SELECT p.phone_number,
                      min(concat_ws(' ', nullif(u.last_name, ''), nullif(u.first_name, ''),
                                    nullif(u.patronymic, ''))) AS owner
               FROM user_internal_phones p LEFT JOIN users u ON u.id = p.user_id
               WHERE p.enterprise_number = $1
               GROUP BY p.phone_number ORDER BY p.phone_number""",
            number,
        )
        out = []
        for r in rows:
            owner = (r["owner"] or "").strip()
            label = f"{r['phone_number']} — {owner}" if owner else str(r["phone_number"])
            out.append({"number": str(r["phone_number"]), "owner": owner, "label": label})
        return out

    async def internal_numbers(self, number: str) -> list[str]:
        rows = await self._pool.fetch(
            """SELECT DISTINCT phone_number FROM user_internal_phones
               WHERE enterprise_number = $1 ORDER BY phone_number""",
            number,
        )
        return [str(r["phone_number"]) for r in rows]

    async def refresh_cache(self, number: str) -> None:
        # NOTIFY does it too; refreshing here makes this instance read its own writes at once.
        try:
            await self._configs.refresh(number)
        except Exception as exc:
            logger.warning(
                "config.cache_refresh_failed enterprise=%s error=%s", number, type(exc).__name__
            )

    # -- internals -----------------------------------------------------------------------------

    async def _send_module(
        self, config: RetailCrmConfig, *, active: bool, event: str
    ) -> tuple[bool, dict[str, Any]]:
        """Send the whole module (with a fresh account link), journaled as ``event``."""
        number = config.enterprise_number
        version = await auth.current_version(self._pool, number)
        payload = module.build_module(
            self._settings,
            config,
            account_url=auth.account_url(self._settings, number, version=version),
            active=active,
        )
        redact = [s.get_secret_value() for s in (config.api_key, config.client_id) if s is not None]
        return await module.edit_module(
            self.client(config),
            payload,
            logs=self._journal,
            enterprise_number=number,
            event_type=event,
            redact=redact,
        )

    async def _set_module_state(self, number: str, *, active: bool, ok: bool) -> None:
        async with self._pool.acquire() as conn:
            await config_store.set_module_state(
                conn,
                number,
                module.module_state(active=active, ok=ok, code=self._settings.module_code),
            )
        await self.refresh_cache(number)


async def _all_users(client: RetailCrmClient, *, max_pages: int = 20) -> list[dict[str, Any]]:
    """Every RetailCRM user of the account (100 a page, at most ``max_pages`` pages)."""
    users: list[dict[str, Any]] = []
    for page in range(1, max_pages + 1):
        body = await client.users(limit=100, page=page)
        users.extend(u for u in body.get("users") or [] if isinstance(u, dict))
        pagination = body.get("pagination") or {}
        if page >= int(pagination.get("totalPageCount") or 1):
            break
    return users


def _user_view(user: dict[str, Any]) -> dict[str, Any]:
    name = " ".join(
        str(user.get(k) or "").strip() for k in ("lastName", "firstName", "patronymic")
    ).strip()
    return {
        "id": str(user.get("id")),
        "name": name or f"#{user.get('id')}",
        "email": user.get("email") or "",
        "status": user.get("status") or "",
        "active": user.get("active", True) is not False,
    }
