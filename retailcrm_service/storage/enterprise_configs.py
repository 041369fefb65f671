"""Enterprise RetailCRM configs as the service reads them: the model, the loaders and the cache.

Public names:

- ``RetailCrmConfig``: one enterprise's full config (frozen). ``api_key`` is a masked ``Secret``
  (decrypted), ``client_id`` too. ``is_on`` = enterprise active and ``retailcrm.enabled`` and a
  usable domain + key; ``key_unreadable`` = it would be on, but the stored key does not decrypt
  here (``api_key_error`` says why). ``smart_redirect`` =
  ``integrations_config.retailcrm.smart_redirect`` merged over ``integrations_config.smart``
  (dict, possibly empty). ``ip`` = ``enterprises.ip``.
- ``load_config(conn, number, *, secret_key)`` / ``load_all_configs(conn, *, secret_key)``: the
  loaders (one enterprise, or every enterprise that has a ``retailcrm`` key).
- ``ConfigCache``: the service's config cache (the library's ``RefreshingCache`` with these
  loaders), owned by the app lifespan and reached as ``runtime.configs``.
  ``await configs.get(number)``, ``configs.peek(number)`` (no I/O),
  ``await configs.find_by_client_id(client_id)`` (O(1), constant-time compare),
  ``await configs.refresh(number)``, ``await configs.refresh_all()``,
  ``configs.active_enterprises()``, ``configs.unreadable_keys()``, ``configs.invalidate(number)``
  (NOTIFY), ``configs.stats()``.

Stored shape of ``integrations_config.retailcrm`` (keys we own, besides the platform's ``enabled``,
``domain``, ``api_key``, ``user_extensions``, ``last_sync``): ``clientId``, ``timezone``,
``account_timezone``, ``internal_calls``, ``external_phones``, ``smart_redirect``, ``module``
(registration state), ``events`` (``incoming_popups``, ``outgoing_popups``, ``call_history``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from retailcrm_service.crm.mapping import DEFAULT_TIMEZONE
from retailcrm_service.security.key_crypto import DecryptionError, decrypt_api_key
from retailcrm_service.security.secrets import Secret
from vochi_crm_client import CacheSettings, LoadError, RefreshingCache, StateError, enabled_sql

logger = logging.getLogger(__name__)

INTEGRATION = "retailcrm"
# What the enterprise sends to RetailCRM (``retailcrm.events``; all on unless switched off).
DEFAULT_EVENTS = {"incoming_popups": True, "outgoing_popups": True, "call_history": True}


@dataclass(frozen=True, slots=True, kw_only=True)
class RetailCrmConfig:
    """One enterprise's RetailCRM configuration, secrets decrypted but masked."""

    enterprise_number: str
    active: bool = True
    enabled: bool = False
    domain: str = ""
    api_key: Secret | None = None
    api_key_error: str | None = None
    client_id: Secret | None = None
    user_extensions: Mapping[str, str | None] = field(default_factory=dict)
    timezone: str = DEFAULT_TIMEZONE
    account_timezone: str | None = None
    internal_calls: bool = False
    external_phones: tuple[Mapping[str, str], ...] = ()
    smart_redirect: Mapping[str, Any] = field(default_factory=dict)
    module: Mapping[str, Any] = field(default_factory=dict)
    events: Mapping[str, bool] = field(default_factory=lambda: dict(DEFAULT_EVENTS))
    last_sync: Any = None
    ip: str | None = None

    @property
    def is_on(self) -> bool:
        return self.active and self.enabled and bool(self.domain) and self.api_key is not None

    @property
    def key_unreadable(self) -> bool:
        """Switched on, but this instance cannot decrypt the stored API key (a wrong or missing
        ``RETAILCRM_SECRET_KEY``): the enterprise's events must wait, not be settled as off."""
        return (
            self.active
            and self.enabled
            and bool(self.domain)
            and self.api_key is None
            and self.api_key_error is not None
        )

    @property
    def extension_by_user(self) -> dict[str, str]:
        """``{"<retailcrm user id>": "<extension>"}`` without the unassigned users."""
        return {uid: ext for uid, ext in self.user_extensions.items() if ext}


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return dict(value) if isinstance(value, Mapping) else {}


def config_from_row(row: Mapping[str, Any], *, secret_key: Secret | None) -> RetailCrmConfig:
    """Build the config from ``enterprises`` columns ``number, active, ip, integrations_config``
    and ``enabled`` (the platform's rule, computed by ``_SELECT``)."""
    number = str(row["number"])
    doc = _as_dict(row["integrations_config"])
    raw = _as_dict(doc.get(INTEGRATION))
    api_key: Secret | None = None
    api_key_error: str | None = None
    stored_key = raw.get("api_key")
    if isinstance(stored_key, str) and stored_key:
        try:
            api_key = decrypt_api_key(stored_key, enterprise_number=number, secret_key=secret_key)
        except DecryptionError as exc:
            api_key_error = str(exc)
            logger.warning("config.api_key_undecryptable enterprise=%s", number)
    client_id = raw.get("clientId")
    extensions = raw.get("user_extensions")
    smart = {**_as_dict(doc.get("smart")), **_as_dict(raw.get("smart_redirect"))}
    phones = raw.get("external_phones")
    return RetailCrmConfig(
        enterprise_number=number,
        active=bool(row["active"]),
        enabled=bool(row["enabled"]),
        domain=str(raw.get("domain") or "").rstrip("/"),
        api_key=api_key,
        api_key_error=api_key_error,
        client_id=Secret(client_id) if isinstance(client_id, str) and client_id else None,
        user_extensions={
            str(k): (str(v) if v not in (None, "") else None)
            for k, v in (extensions.items() if isinstance(extensions, Mapping) else ())
        },
        timezone=str(raw.get("timezone") or DEFAULT_TIMEZONE),
        account_timezone=str(raw["account_timezone"]) if raw.get("account_timezone") else None,
        internal_calls=raw.get("internal_calls") is True,
        external_phones=tuple(
            {str(k): str(v) for k, v in p.items()}
            for p in (phones if isinstance(phones, list) else [])
            if isinstance(p, Mapping)
        ),
        smart_redirect=smart,
        module=_as_dict(raw.get("module")),
        events={
            name: _as_dict(raw.get("events")).get(name) is not False for name in DEFAULT_EVENTS
        },
        last_sync=raw.get("last_sync"),
        ip=row["ip"],
    )


# "enabled" is the platform's rule, the one the call services' matrix and the outbox apply.
_ENABLED = enabled_sql("active", "integrations_config -> 'retailcrm'")
_SELECT = f"SELECT number, active, ip, integrations_config, {_ENABLED} AS enabled FROM enterprises"  # noqa: S608 (constants)


async def load_config(
    conn: asyncpg.Connection | asyncpg.Pool, number: str, *, secret_key: Secret | None
) -> RetailCrmConfig | None:
    """The enterprise's config; None when the enterprise does not exist."""
    row = await conn.fetchrow(_SELECT + " WHERE number = $1", number)
    return None if row is None else config_from_row(row, secret_key=secret_key)


async def load_all_configs(
    conn: asyncpg.Connection | asyncpg.Pool, *, secret_key: Secret | None
) -> dict[str, RetailCrmConfig]:
    """Every enterprise that has a ``retailcrm`` key, by number."""
    rows = await conn.fetch(_SELECT + " WHERE integrations_config ? 'retailcrm'")
    return {str(r["number"]): config_from_row(r, secret_key=secret_key) for r in rows}


def _digest(client_id: str) -> bytes:
    # The index is keyed by a digest so that a dict probe reveals nothing about stored ids.
    return hashlib.sha256(client_id.encode()).digest()


class ConfigCache:
    """The service's config cache: the library's ``RefreshingCache`` with the loaders above.

    An async context manager owned by the lifespan. ``None`` from ``get`` means: no such
    enterprise. ``invalidate`` is what the NOTIFY listener calls. Loads that fail raise
    ``vochi_crm_client.LoadError`` (the old value stays cached).
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        secret_key: Secret | None,
        settings: CacheSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._pool = pool
        self._secret_key = secret_key
        # Side index of what the loaders returned: clientId digest -> number, and the numbers
        # seen. Only a hint: every hit is re-checked against the cache's current value.
        self._by_client: dict[bytes, str] = {}
        # clientIds found on several enterprises (a config copied by hand): they identify no one.
        self._shared_clients: set[bytes] = set()
        self._known: set[str] = set()
        self._prefetches: set[asyncio.Task[None]] = set()
        self.cache: RefreshingCache[str, RetailCrmConfig] = RefreshingCache(
            load_one=self._load_one,
            load_all=self._load_all,
            settings=settings or CacheSettings(),
            name="retailcrm_configs",
            describe_key=str,
            clock=clock,
            sleep=sleep,
        )

    async def __aenter__(self) -> ConfigCache:
        await self.cache.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._prefetches):
            task.cancel()
        await asyncio.gather(*self._prefetches, return_exceptions=True)
        await self.cache.__aexit__(*exc_info)

    # -- loaders ------------------------------------------------------------------------------

    def _note(self, config: RetailCrmConfig) -> None:
        self._known.add(config.enterprise_number)
        if config.client_id is not None:
            digest = _digest(config.client_id.get_secret_value())
            owner = self._by_client.get(digest)
            if owner is not None and owner != config.enterprise_number:
                self._shared_clients.add(digest)
                logger.warning(
                    "config.client_id_shared enterprises=%s,%s", owner, config.enterprise_number
                )
            self._by_client[digest] = config.enterprise_number

    async def _load_one(self, number: str) -> RetailCrmConfig | None:
        config = await load_config(self._pool, number, secret_key=self._secret_key)
        if config is None:
            self._known.discard(number)
        else:
            self._note(config)
        return config

    async def _load_all(self) -> dict[str, RetailCrmConfig]:
        configs = await load_all_configs(self._pool, secret_key=self._secret_key)
        self._by_client = {}
        self._shared_clients = set()
        self._known = set()
        for config in configs.values():
            self._note(config)
        return configs

    # -- reads --------------------------------------------------------------------------------

    def peek(self, number: str) -> RetailCrmConfig | None:
        """The cached config without I/O; None when unknown, absent or not loaded yet."""
        value = self.cache.peek(number)
        return value if isinstance(value, RetailCrmConfig) else None

    async def get(self, number: str) -> RetailCrmConfig | None:
        return await self.cache.get(number)

    async def find_by_client_id(self, client_id: str) -> RetailCrmConfig | None:
        """The config whose ``clientId`` equals ``client_id`` (O(1), constant-time compare)."""
        if not client_id:
            return None
        digest = _digest(client_id)
        if digest in self._shared_clients:
            return None
        number = self._by_client.get(digest)
        if number is None:
            return None
        config = await self.cache.get(number)
        if config is None or config.client_id is None:
            return None
        if not hmac.compare_digest(
            config.client_id.get_secret_value().encode(), client_id.encode()
        ):
            return None
        return config

    def active_enterprises(self) -> list[str]:
        """Enterprises whose cached config is on (active, enabled, domain and key)."""
        out = []
        for number in list(self._known):
            config = self.peek(number)
            if config is not None and config.is_on:
                out.append(number)
        return sorted(out)

    # -- refresh ------------------------------------------------------------------------------

    async def refresh(self, number: str) -> RetailCrmConfig | None:
        """Drop and reload one enterprise now."""
        self.cache.invalidate(number, reload=False)
        return await self.cache.get(number)

    async def refresh_all(self) -> int:
        """Full reload; returns the number of enterprises with a RetailCRM config."""
        await self.cache.reload_all()
        return len(self._known)

    def invalidate(self, number: str | None = None) -> None:
        """NOTIFY hook: one enterprise (reloaded in the background), or everything.

        The enterprise is reloaded even when it was not cached (a first RetailCRM config, a
        negative entry): its clientId, created by whichever instance saved the config, must
        reach ``find_by_client_id`` here now, not at the next full reload minutes later.
        """
        if number is None or number == "*":
            self.cache.invalidate_all()
            return
        self.cache.invalidate(number, reload=False)
        task = asyncio.get_running_loop().create_task(self._prefetch(number))
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _prefetch(self, number: str) -> None:
        # A failure is counted and logged by the cache; the next read retries.
        with contextlib.suppress(LoadError, StateError):
            await self.cache.get(number)

    def unreadable_keys(self) -> list[str]:
        """Enterprises switched on whose cached API key this instance cannot decrypt."""
        out = []
        for number in list(self._known):
            config = self.peek(number)
            if config is not None and config.key_unreadable:
                out.append(number)
        return sorted(out)

    def stats(self) -> dict[str, Any]:
        stats = self.cache.stats()
        stats["active"] = len(self.active_enterprises())
        stats["unreadable_keys"] = self.unreadable_keys()
        return stats
