"""The service's settings: the only module that reads the environment (docs/operations.md).

``Settings.from_env(environ=None)`` reads every variable once, validates it and names the variable
in the error (``SettingsError``); command-line flags are applied over it by the CLI
(flag > environment > default). Components receive the parts they need (``settings.asterisk``,
``settings.pipeline``), never the environment.

| variable | default | meaning |
|---|---|---|
| ``DATABASE_URL`` | embedded PostgreSQL under the data dir | PostgreSQL DSN |
| ``RETAILCRM_HOST`` / ``RETAILCRM_PORT`` | ``127.0.0.1`` / ``8019`` | where ``serve`` listens |
| ``RETAILCRM_PUBLIC_PORT`` | unset: none | the public side's port (deploy/nginx.conf) |
| ``RETAILCRM_DATA_DIR`` | ``./.vochi-data`` | embedded PostgreSQL, dev JWT secret |
| ``RETAILCRM_JWT_SECRET`` | generated under the data dir | admin session signing key (32+) |
| ``RETAILCRM_SECRET_KEY`` | unset: API keys stored as given | encrypts API keys at rest |
| ``RETAILCRM_PUBLIC_URL`` | ``http://127.0.0.1:<port>`` | base of accountUrl / makeCallUrl |
| ``RETAILCRM_INTERNAL_TOKEN`` | unset: loopback only | lets non-loopback internal callers in |
| ``RETAILCRM_ALLOW_HTTP`` | ``0`` | ``1`` allows ``http://127.0.0.1:<port>`` CRM domains |
| ``RETAILCRM_LOG_RETENTION_DAYS`` | ``30`` | ``integration_logs`` retention (0: forever) |
| ``RETAILCRM_MODULE_CODE`` | ``vochi-telephony`` | the RetailCRM integration module's code |
| ``RETAILCRM_API_TIMEOUT`` | ``3.0`` | seconds per RetailCRM request |
| ``RETAILCRM_OUTBOX_POPUP_TTL`` | ``30`` | seconds a popup stays worth sending |
| ``RETAILCRM_OUTBOX_LEASE_SECONDS`` | ``60`` | how long a claimed row is ours |
| ``RETAILCRM_OUTBOX_MAX_ATTEMPTS`` | ``200`` | attempts before a row is dead-lettered |
| ``RETAILCRM_OUTBOX_RETRY_CAP`` | ``300`` | longest wait between attempts, seconds |
| ``RETAILCRM_OUTBOX_RETENTION_DAYS`` | ``7`` | how long settled rows are kept |
| ``RETAILCRM_DELIVERY_POLL_INTERVAL`` | ``0.5`` | delivery's poll when no commit wakes it |
| ``RETAILCRM_DELIVERY_BREAKER_OPEN_MAX`` | ``15`` | longest open period of an account's breaker |
| ``RETAILCRM_DELIVERY_POPUP_CONCURRENCY`` | ``4`` | an account's popups in flight at once |
| ``RETAILCRM_PACING_GENERAL_RPS`` | ``8`` | requests/s per API key (RetailCRM allows 10) |
| ``RETAILCRM_PACING_TELEPHONY_RPS`` | ``32`` | telephony requests/s per key (RetailCRM: 40) |
| ``RETAILCRM_DIALPLAN_RPS`` | ``20`` | dialplan lookups/s per enterprise (bursts of twice that) |
| ``RETAILCRM_SSH_USER`` | ``root`` | SSH user on Asterisk hosts |
| ``RETAILCRM_SSH_KEY`` | unset: the agent's/default keys | private key file |
| ``RETAILCRM_SSH_KNOWN_HOSTS`` | ``~/.ssh/known_hosts`` | host keys (unknown keys are refused) |
| ``RETAILCRM_SSH_PORT`` | ``22`` | SSH port of Asterisk hosts |
| ``RETAILCRM_SSH_CONNECT_TIMEOUT`` | ``5`` | seconds |
| ``RETAILCRM_SSH_COMMAND_TIMEOUT`` | ``10`` | seconds |
| ``RETAILCRM_SSH_IDLE_CLOSE`` | ``60`` | seconds before an idle connection closes |
| ``RETAILCRM_LOG_FORMAT`` | ``text`` | ``text`` (quoted key=value) or ``json`` (``--log-format``) |

In dev, with no ``RETAILCRM_JWT_SECRET``, a random secret is generated and persisted under the data
dir (mode 0600) rather than running without auth; a ``settings.jwt_secret_generated`` log line
says so.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from retailcrm_service.crm.pacing import PacingConfig
from retailcrm_service.pipeline.delivery import CLAIM_GAP, DeliveryConfig
from retailcrm_service.pipeline.outbox import OutboxConfig
from retailcrm_service.security.secrets import Secret
from retailcrm_service.telephony.asterisk_ssh import AsteriskSettings
from vochi_crm_client import BackoffPolicy, BreakerConfig

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting's value is unusable; the message names the variable."""


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be 1 or 0, got {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    if not env.get(name, "").strip():
        return None
    return _int(env, name, 0)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    return value


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {env.get(name)!r}")
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise SettingsError(f"{name} must be at least 1, got {env.get(name)!r}")
    return value


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
class PipelineSettings:
    """The outbox's and the delivery workers' policies."""

    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the service reads from the environment; validated when built."""

    database_url: Secret
    jwt_secret: Secret
    host: str = "127.0.0.1"
    port: int = 8019
    # The public side's listener: what arrives on it is never internal (deploy/nginx.conf).
    public_port: int | None = None
    secret_key: Secret | None = None
    public_url: str = ""
    internal_token: Secret | None = None
    allow_http: bool = False
    data_dir: Path = field(default_factory=lambda: Path("./.vochi-data"))
    log_retention_days: int = 30
    module_code: str = "vochi-telephony"
    module_name: str = "Vochi-CRM"
    retailcrm_timeout: float = 3.0
    dialplan_rps: float = 20.0
    admin_session_ttl_seconds: int = 12 * 3600
    admin_session_idle_seconds: int = 2 * 3600
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    asterisk: AsteriskSettings = field(default_factory=AsteriskSettings)
    pipeline: PipelineSettings = field(default_factory=lambda: PipelineSettings())
    # Development fall-backs in use: one instance only (retailcrm_service/ops/instances.py).
    embedded_database: bool = False
    jwt_secret_generated: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.public_port is not None and not 0 < self.public_port < 65536:
            raise SettingsError(f"RETAILCRM_PUBLIC_PORT must be 1..65535, got {self.public_port}")
        if self.public_port == self.port:
            raise SettingsError("RETAILCRM_PUBLIC_PORT must differ from RETAILCRM_PORT")
        if not self.jwt_secret.get_secret_value():
            raise ValueError("jwt_secret must not be empty")
        if len(self.jwt_secret.get_secret_value()) < 32:
            raise ValueError("RETAILCRM_JWT_SECRET must be at least 32 characters")
        if self.log_retention_days < 0:
            raise ValueError("log_retention_days must be >= 0")
        if self.retailcrm_timeout <= 0:
            raise ValueError("retailcrm_timeout must be > 0")
        if not 0 < self.dialplan_rps < math.inf:
            raise ValueError("dialplan_rps must be a positive number")
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
        """Read the settings from ``environ`` (default ``os.environ``); ``SettingsError`` names
        the variable whose value is unusable."""
        env = os.environ if environ is None else environ
        data_dir = data_dir_from(env)
        db_url = env.get("DATABASE_URL", "").strip()
        if not db_url:
            from retailcrm_service.storage.database import embedded_database_url

            db_url = embedded_database_url(data_dir)
        jwt_raw = env.get("RETAILCRM_JWT_SECRET", "").strip()
        jwt_secret = Secret(jwt_raw) if jwt_raw else dev_jwt_secret(data_dir)
        values = dict(
            database_url=Secret(db_url),
            jwt_secret=jwt_secret,
            host=env.get("RETAILCRM_HOST", "").strip() or "127.0.0.1",
            port=_int(env, "RETAILCRM_PORT", 8019),
            public_port=_optional_int(env, "RETAILCRM_PUBLIC_PORT"),
            secret_key=_optional_secret(env, "RETAILCRM_SECRET_KEY"),
            public_url=env.get("RETAILCRM_PUBLIC_URL", "").strip(),
            internal_token=_optional_secret(env, "RETAILCRM_INTERNAL_TOKEN"),
            allow_http=_flag(env, "RETAILCRM_ALLOW_HTTP"),
            data_dir=data_dir,
            log_retention_days=_int(env, "RETAILCRM_LOG_RETENTION_DAYS", 30),
            module_code=env.get("RETAILCRM_MODULE_CODE", "").strip() or "vochi-telephony",
            retailcrm_timeout=_float(env, "RETAILCRM_API_TIMEOUT", 3.0),
            dialplan_rps=_positive(env, "RETAILCRM_DIALPLAN_RPS", 20.0),
            asterisk=asterisk_from(env),
            pipeline=pipeline_from(env),
            embedded_database=not env.get("DATABASE_URL", "").strip(),
            jwt_secret_generated=not jwt_raw,
        )
        return _built(cls, values, _FIELD_VARIABLES)


# Which variable a Settings field comes from, so a validation error can name it.
_FIELD_VARIABLES = {
    "port": "RETAILCRM_PORT",
    "jwt_secret": "RETAILCRM_JWT_SECRET",
    "log_retention_days": "RETAILCRM_LOG_RETENTION_DAYS",
    "retailcrm_timeout": "RETAILCRM_API_TIMEOUT",
    "dialplan_rps": "RETAILCRM_DIALPLAN_RPS",
    "public_url": "RETAILCRM_PUBLIC_URL",
}


_T = TypeVar("_T")


def _built(cls: type[_T], values: dict[str, Any], variables: Mapping[str, str]) -> _T:
    try:
        return cls(**values)
    except SettingsError:
        raise
    except ValueError as exc:
        message = str(exc)
        named = [v for f, v in variables.items() if f in message or v in message]
        if named and named[0] not in message:
            message = f"{named[0]}: {message}"
        raise SettingsError(message) from None


def data_dir_from(env: Mapping[str, str]) -> Path:
    """``RETAILCRM_DATA_DIR`` (default ``./.vochi-data``)."""
    return Path(env.get("RETAILCRM_DATA_DIR", "").strip() or "./.vochi-data")


def database_url_from(env: Mapping[str, str] | None = None) -> str | None:
    """``DATABASE_URL`` when set (else None: the caller decides on an embedded server)."""
    env = os.environ if env is None else env
    return env.get("DATABASE_URL", "").strip() or None


def log_format_from(env: Mapping[str, str]) -> str:
    """``RETAILCRM_LOG_FORMAT``: ``text`` (default) or ``json``; read before anything logs."""
    raw = env.get("RETAILCRM_LOG_FORMAT", "").strip().lower() or "text"
    if raw not in ("text", "json"):
        raise SettingsError(f"RETAILCRM_LOG_FORMAT must be text or json, got {raw!r}")
    return raw


def asterisk_from(env: Mapping[str, str]) -> AsteriskSettings:
    """``RETAILCRM_SSH_*``."""
    defaults = AsteriskSettings()
    values = dict(
        user=env.get("RETAILCRM_SSH_USER", "").strip() or defaults.user,
        key_path=env.get("RETAILCRM_SSH_KEY", "").strip() or None,
        known_hosts=env.get("RETAILCRM_SSH_KNOWN_HOSTS", "").strip() or defaults.known_hosts,
        port=_int(env, "RETAILCRM_SSH_PORT", defaults.port),
        connect_timeout=_positive(env, "RETAILCRM_SSH_CONNECT_TIMEOUT", defaults.connect_timeout),
        command_timeout=_positive(env, "RETAILCRM_SSH_COMMAND_TIMEOUT", defaults.command_timeout),
        idle_close=_positive(env, "RETAILCRM_SSH_IDLE_CLOSE", defaults.idle_close),
    )
    variables = {
        "user": "RETAILCRM_SSH_USER",
        "port": "RETAILCRM_SSH_PORT",
        "known_hosts": "RETAILCRM_SSH_KNOWN_HOSTS",
        "connect_timeout": "RETAILCRM_SSH_CONNECT_TIMEOUT",
        "command_timeout": "RETAILCRM_SSH_COMMAND_TIMEOUT",
        "idle_close": "RETAILCRM_SSH_IDLE_CLOSE",
    }
    return _built(AsteriskSettings, values, variables)


def pipeline_from(env: Mapping[str, str]) -> PipelineSettings:
    """``RETAILCRM_OUTBOX_*``, ``RETAILCRM_DELIVERY_*`` and ``RETAILCRM_PACING_*``."""
    retry_cap = _positive(env, "RETAILCRM_OUTBOX_RETRY_CAP", 300.0)
    open_max = _positive(env, "RETAILCRM_DELIVERY_BREAKER_OPEN_MAX", 15.0)
    poll_interval = _positive(env, "RETAILCRM_DELIVERY_POLL_INTERVAL", 0.5)
    try:
        outbox = OutboxConfig(
            popup_ttl=_positive(env, "RETAILCRM_OUTBOX_POPUP_TTL", 30.0),
            lease_seconds=_positive(env, "RETAILCRM_OUTBOX_LEASE_SECONDS", 60.0),
            max_attempts=_positive_int(env, "RETAILCRM_OUTBOX_MAX_ATTEMPTS", 200),
            retention_days=_positive(env, "RETAILCRM_OUTBOX_RETENTION_DAYS", 7.0),
            history_gather=_float(env, "RETAILCRM_OUTBOX_HISTORY_GATHER", 0.5),
            retry=BackoffPolicy(base=min(1.0, retry_cap), cap=retry_cap),
        )
    except ValueError as exc:
        raise SettingsError(f"RETAILCRM_OUTBOX_*: {exc}") from None
    try:
        delivery = DeliveryConfig(
            poll_interval=poll_interval,
            claim_gap=min(CLAIM_GAP, poll_interval / 2),
            popup_concurrency=_positive_int(env, "RETAILCRM_DELIVERY_POPUP_CONCURRENCY", 4),
            breaker=BreakerConfig(open_base=min(2.0, open_max), open_max=open_max),
            pacing=PacingConfig(
                general_rps=_positive(env, "RETAILCRM_PACING_GENERAL_RPS", 8.0),
                telephony_rps=_positive(env, "RETAILCRM_PACING_TELEPHONY_RPS", 32.0),
            ),
        )
    except ValueError as exc:
        raise SettingsError(f"RETAILCRM_DELIVERY_*/RETAILCRM_PACING_*: {exc}") from None
    return PipelineSettings(outbox=outbox, delivery=delivery)
