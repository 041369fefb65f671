"""Writes of ``integrations_config.retailcrm`` and the validated input model of the config API.

Every write touches only the ``retailcrm`` key, as one ``UPDATE`` that merges into the current
value (``jsonb_set`` + ``||``), so concurrent writers of other integrations' keys (or of the
platform's own keys inside ``retailcrm``) lose nothing; never a read-modify-write of the document.

Public names: ``ConfigIn`` (pydantic; validate with ``context={"allow_http": bool}``),
``save_config``, ``remove_config``, ``set_module_state``, ``set_user_extensions``,
``validate_user_extensions``, ``ExtensionsIn``, ``NotFound``, ``ApiKeyRequired``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from retailcrm_service.crm.mapping import DEFAULT_TIMEZONE
from retailcrm_service.security.key_crypto import encrypt_api_key
from retailcrm_service.security.secrets import Secret

# RetailCRM / Simla account hosts: <account>.retailcrm.<tld> or <account>.simla.<tld>.
_ACCOUNT_HOST = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.(?:retailcrm\.(?:ru|pro|es|com|io|by|kz|ua|net)"
    r"|simla\.(?:com|io|ru|net))$"
)
_API_KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_USER_ID = re.compile(r"^[0-9]{1,12}$")
_EXTENSION = re.compile(r"^[0-9]{2,5}$")
_PHONE = re.compile(r"^\+?[0-9]{5,20}$")
_SITE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_storable(value: Any, depth: int = 0) -> None:
    """ValueError unless PostgreSQL's jsonb can store ``value`` (free-form JSON from a request).

    jsonb refuses NUL characters, lone surrogates and non-finite numbers: letting them through
    would turn a bad request into a failed write (a 500) instead of a 422.
    """
    if depth > 16:
        raise ValueError("nested too deeply (at most 16 levels)")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, depth + 1)
            check_storable(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_storable(item, depth + 1)


class NotFound(Exception):
    """The enterprise does not exist."""


class ApiKeyRequired(Exception):
    """A first save, and a save that changes the domain, must carry an API key."""


class ExternalPhone(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    site_code: str = Field(alias="siteCode")
    external_phone: str = Field(alias="externalPhone")

    @field_validator("site_code")
    @classmethod
    def _site(cls, value: str) -> str:
        if not _SITE.fullmatch(value):
            raise ValueError("site code: letters, digits, _ . - (1-64)")
        return value

    @field_validator("external_phone")
    @classmethod
    def _phone(cls, value: str) -> str:
        if not _PHONE.fullmatch(value):
            raise ValueError("phone: digits with an optional leading +")
        return value


def validate_domain(value: str, *, allow_http: bool) -> str:
    """The normalized account URL, or ValueError saying what is wrong."""
    raw = value.strip()
    parts = urlsplit(raw)
    if parts.username or parts.password:
        raise ValueError("the domain must not contain credentials")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError("the domain is the account URL only, e.g. https://acme.retailcrm.ru")
    host = (parts.hostname or "").lower()
    if parts.scheme == "https":
        if parts.port is not None or not _ACCOUNT_HOST.fullmatch(host):
            raise ValueError(
                "must be a RetailCRM or Simla account URL, e.g. https://acme.retailcrm.ru"
            )
        return f"https://{host}"
    if parts.scheme == "http" and host == "127.0.0.1" and parts.port:
        if not allow_http:
            raise ValueError("http://127.0.0.1 is allowed only with RETAILCRM_ALLOW_HTTP=1")
        return f"http://127.0.0.1:{parts.port}"
    raise ValueError(
        "must be an https RetailCRM or Simla account URL, e.g. https://acme.retailcrm.ru"
    )


def normalize_api_key(value: str | None) -> str | None:
    """None for "keep the stored key" (absent, empty, or the masked value read back)."""
    if value is None or value == "" or value.startswith("***"):
        return None
    if not _API_KEY.fullmatch(value):
        raise ValueError("an API key is 16-128 letters, digits, '-' or '_'")
    return value


def validate_user_extensions(value: dict[str, str | None]) -> dict[str, str | None]:
    """``{RetailCRM user id: extension or None}``; ValueError naming the first problem."""
    out: dict[str, str | None] = {}
    for user_id, ext in value.items():
        if not _USER_ID.fullmatch(user_id):
            raise ValueError(f"user id {user_id!r} must be digits (a RetailCRM user id)")
        if ext not in (None, "") and not _EXTENSION.fullmatch(str(ext)):
            raise ValueError(f"extension of user {user_id} must be 2-5 digits or null")
        out[user_id] = ext or None
    taken = [e for e in out.values() if e]
    if len(taken) != len(set(taken)):
        raise ValueError("an extension is assigned to several users")
    return out


class ExtensionsIn(BaseModel):
    """Body of the admin's ``PUT .../extensions/{n}``: the whole mapping, one owner per number."""

    model_config = ConfigDict(extra="forbid")

    user_extensions: dict[str, str | None]

    @field_validator("user_extensions")
    @classmethod
    def _extensions(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        return validate_user_extensions(value)


def _check_zone(value: str) -> str:
    # OSError: a name too long for a file, or a directory of the zone database ("Europe").
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown timezone {value[:64]!r}") from None
    return value


class EventOptions(BaseModel):
    """What the enterprise sends to RetailCRM (the module's event flags)."""

    model_config = ConfigDict(extra="forbid")

    incoming_popups: bool = True
    outgoing_popups: bool = True
    call_history: bool = True


class ConfigIn(BaseModel):
    """Body of ``PUT /api/config/{n}``; ``api_key`` may be omitted to keep the stored one."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    domain: str
    api_key: str | None = None
    enabled: bool = True
    user_extensions: dict[str, str | None] = Field(default_factory=dict)
    timezone: str = DEFAULT_TIMEZONE
    account_timezone: str | None = None
    internal_calls: bool = False
    external_phones: list[ExternalPhone] = Field(default_factory=list)
    smart_redirect: dict[str, Any] | None = None
    events: EventOptions | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str, info: ValidationInfo) -> str:
        allow_http = bool((info.context or {}).get("allow_http", False))
        return validate_domain(value, allow_http=allow_http)

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        return normalize_api_key(value)

    @field_validator("user_extensions")
    @classmethod
    def _extensions(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        return validate_user_extensions(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return _check_zone(value)

    @field_validator("account_timezone")
    @classmethod
    def _account_timezone(cls, value: str | None) -> str | None:
        return _check_zone(value) if value else None

    @field_validator("smart_redirect")
    @classmethod
    def _smart_redirect(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_storable(value)
        return value


async def save_config(
    conn: asyncpg.Connection,
    number: str,
    body: ConfigIn,
    *,
    secret_key: Secret | None,
) -> None:
    """Merge ``body`` into ``integrations_config.retailcrm``; a first save creates ``clientId``."""
    patch: dict[str, Any] = {
        "domain": body.domain,
        "enabled": body.enabled,
        "user_extensions": body.user_extensions,
        "timezone": body.timezone,
        "account_timezone": body.account_timezone,
        "internal_calls": body.internal_calls,
        "external_phones": [p.model_dump(by_alias=True) for p in body.external_phones],
    }
    if body.smart_redirect is not None:
        patch["smart_redirect"] = body.smart_redirect
    if body.events is not None:
        patch["events"] = body.events.model_dump()
    if body.api_key is not None:
        patch["api_key"] = encrypt_api_key(
            body.api_key, enterprise_number=number, secret_key=secret_key
        )
    async with conn.transaction():
        # Locks the row and reads only our key and domain: a first save needs a key, and so does
        # a new domain (the saved key must never follow a domain someone else picked).
        row = await conn.fetchrow(
            """SELECT integrations_config -> 'retailcrm' ->> 'api_key' AS api_key,
                      integrations_config -> 'retailcrm' ->> 'domain' AS domain
               FROM enterprises WHERE number = $1 FOR UPDATE""",
            number,
        )
        if row is None:
            raise NotFound(number)
        same_domain = (row["domain"] or "").rstrip("/").lower() == body.domain
        if body.api_key is None and not (row["api_key"] and same_domain):
            raise ApiKeyRequired(number)
        await conn.execute(
            """UPDATE enterprises SET integrations_config = jsonb_set(
                   CASE WHEN jsonb_typeof(integrations_config) = 'object'
                        THEN integrations_config ELSE '{}'::jsonb END,
                   '{retailcrm}',
                   jsonb_build_object('clientId', $3::text)
                     || CASE WHEN jsonb_typeof(integrations_config -> 'retailcrm') = 'object'
                             THEN integrations_config -> 'retailcrm' ELSE '{}'::jsonb END
                     || $2::jsonb)
               WHERE number = $1""",
            number,
            json.dumps(patch),
            new_client_id(),
        )


def new_client_id() -> str:
    """A long random module clientId (RetailCRM sends it back in callbacks; it is a secret)."""
    return secrets.token_urlsafe(32)


async def set_module_state(conn: asyncpg.Connection, number: str, state: dict[str, Any]) -> None:
    """Record the module registration state under ``retailcrm.module`` (only that sub-key)."""
    await conn.execute(
        """UPDATE enterprises SET integrations_config = jsonb_set(
               integrations_config, '{retailcrm,module}', $2::jsonb, true)
           WHERE number = $1 AND jsonb_typeof(integrations_config -> 'retailcrm') = 'object'""",
        number,
        json.dumps(state),
    )


async def set_user_extensions(
    conn: asyncpg.Connection, number: str, extensions: dict[str, str | None]
) -> bool:
    """Replace ``retailcrm.user_extensions`` (only that sub-key); False without a config."""
    status = await conn.execute(
        """UPDATE enterprises SET integrations_config = jsonb_set(
               integrations_config, '{retailcrm,user_extensions}', $2::jsonb, true)
           WHERE number = $1 AND jsonb_typeof(integrations_config -> 'retailcrm') = 'object'""",
        number,
        json.dumps(extensions),
    )
    return str(status).endswith(" 1")


async def remove_config(conn: asyncpg.Connection, number: str) -> bool:
    """Remove the ``retailcrm`` key; False when the enterprise had none."""
    status = await conn.execute(
        """UPDATE enterprises SET integrations_config = integrations_config - 'retailcrm'
           WHERE number = $1 AND integrations_config ? 'retailcrm'""",
        number,
    )
    return str(status).endswith(" 1")
