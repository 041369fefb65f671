"""The service's settings, read once from the environment (ARCHITECTURE.md §5).

Public names:

- ``Secret``: a string whose ``repr``/``str`` are masked (``***`` plus at most the last 4 chars);
  read it with ``.get_secret_value()``.
- ``Settings``: a frozen, validated dataclass; ``Settings.from_env(environ=None)`` builds it.

Environment variables:

| variable | field | default |
|---|---|---|
| ``DATABASE_URL`` | ``database_url`` (Secret) | embedded PostgreSQL under the data dir |
| ``RETAILCRM_HOST`` / ``RETAILCRM_PORT`` | ``host`` / ``port`` | ``127.0.0.1`` / ``8019`` |
| ``RETAILCRM_JWT_SECRET`` | ``jwt_secret`` (Secret) | generated into ``<data dir>/jwt_secret`` |
| ``RETAILCRM_SECRET_KEY`` | ``secret_key`` (Secret or None) | None: API keys stored as given |
| ``RETAILCRM_PUBLIC_URL`` | ``public_url`` | ``http://127.0.0.1:<port>`` |
| ``RETAILCRM_INTERNAL_TOKEN`` | ``internal_token`` (Secret or None) | None: loopback callers only |
| ``RETAILCRM_ALLOW_HTTP`` | ``allow_http`` | false; ``1`` allows ``http://127.0.0.1:<port>`` |
| ``RETAILCRM_DATA_DIR`` | ``data_dir`` | ``./.vochi-data`` |
| ``RETAILCRM_LOG_RETENTION_DAYS`` | ``log_retention_days`` | 30 (0 keeps logs forever) |
| ``RETAILCRM_MODULE_CODE`` | ``module_code`` | ``vochi-telephony`` |
| ``RETAILCRM_API_TIMEOUT`` | ``retailcrm_timeout`` | 3.0 s |
| ``RETAILCRM_SSH_*`` | ``asterisk.AsteriskSettings.from_env`` | see there |

In dev, with no ``RETAILCRM_JWT_SECRET``, a random secret is generated and persisted under the data
dir (mode 0600) rather than running without auth; a ``settings.jwt_secret_generated`` log line
says so.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class Secret:
    """A secret string: masked in ``repr``/``str``, compared in constant time."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    @property
    def masked(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret('{self.masked}')"

    def __str__(self) -> str:
        return self.masked

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return secrets.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:  # pickling would be a way to leak it
        raise TypeError("Secret cannot be pickled")


def mask(value: str) -> str:
    """``***`` plus the last 4 chars, only when the value is long enough to stay mostly hidden."""
    if len(value) >= 16:
        return "***" + value[-4:]
    return "***"


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _optional_secret(env: Mapping[str, str], name: str) -> Secret | None:
    raw = env.get(name, "").strip()
    return Secret(raw) if raw else None


def dev_jwt_secret(data_dir: Path) -> Secret:
    """The JWT secret persisted under ``data_dir``, created (0600) on first use."""
    path = data_dir / "jwt_secret"
    try:
        value = path.read_text("utf-8").strip()
    except FileNotFoundError:
        value = ""
    if not value:
        data_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(value)
        logger.warning(
            "settings.jwt_secret_generated path=%s (RETAILCRM_JWT_SECRET is unset; "
            "a random secret was generated and persisted for dev use)",
            path,
        )
    else:
        logger.info("settings.jwt_secret_loaded path=%s", path)
    return Secret(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the service reads from the environment; validated when built."""

    database_url: Secret
    jwt_secret: Secret
    host: str = "127.0.0.1"
    port: int = 8019
    secret_key: Secret | None = None
    public_url: str = ""
    internal_token: Secret | None = None
    allow_http: bool = False
    data_dir: Path = field(default_factory=lambda: Path("./.vochi-data"))
    log_retention_days: int = 30
    module_code: str = "vochi-telephony"
    module_name: str = "Vochi-CRM"
    retailcrm_timeout: float = 3.0
    admin_session_ttl_seconds: int = 12 * 3600
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    # RETAILCRM_SSH_* live in retailcrm_service.asterisk.AsteriskSettings (read by its component).

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if not self.jwt_secret.get_secret_value():
            raise ValueError("jwt_secret must not be empty")
        if len(self.jwt_secret.get_secret_value()) < 32:
            raise ValueError("RETAILCRM_JWT_SECRET must be at least 32 characters")
        if self.log_retention_days < 0:
            raise ValueError("log_retention_days must be >= 0")
        if self.retailcrm_timeout <= 0:
            raise ValueError("retailcrm_timeout must be > 0")
        if not 0 < self.db_pool_min_size <= self.db_pool_max_size:
            raise ValueError("db pool sizes must satisfy 0 < min <= max")
        if self.public_url:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    f"RETAILCRM_PUBLIC_URL must be an http(s) URL: {self.public_url!r}"
                )
            if parts.query or parts.fragment:
                raise ValueError("RETAILCRM_PUBLIC_URL must not have a query or fragment")

    @property
    def public_base_url(self) -> str:
        """Base of the URLs RetailCRM and admins follow, without a trailing slash."""
        return (self.public_url or f"http://127.0.0.1:{self.port}").rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("RETAILCRM_DATA_DIR", "").strip() or "./.vochi-data")
        db_url = env.get("DATABASE_URL", "").strip()
        if not db_url:
            from retailcrm_service import db

            db_url = db.database_url({"RETAILCRM_DATA_DIR": str(data_dir)})
        jwt_raw = env.get("RETAILCRM_JWT_SECRET", "").strip()
        jwt_secret = Secret(jwt_raw) if jwt_raw else dev_jwt_secret(data_dir)
        return cls(
            database_url=Secret(db_url),
            jwt_secret=jwt_secret,
            host=env.get("RETAILCRM_HOST", "").strip() or "127.0.0.1",
            port=_int(env, "RETAILCRM_PORT", 8019),
            secret_key=_optional_secret(env, "RETAILCRM_SECRET_KEY"),
            public_url=env.get("RETAILCRM_PUBLIC_URL", "").strip(),
            internal_token=_optional_secret(env, "RETAILCRM_INTERNAL_TOKEN"),
            allow_http=_flag(env, "RETAILCRM_ALLOW_HTTP"),
            data_dir=data_dir,
            log_retention_days=_int(env, "RETAILCRM_LOG_RETENTION_DAYS", 30),
            module_code=env.get("RETAILCRM_MODULE_CODE", "").strip() or "vochi-telephony",
            retailcrm_timeout=_float(env, "RETAILCRM_API_TIMEOUT", 3.0),
        )
