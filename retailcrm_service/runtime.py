"""The composition root: every long-lived part of one service instance, built in one visible order.

``open_runtime(settings, metrics, parts=ALL_PARTS)`` opens, in this order, and closes in reverse:

1. ``pool``: the asyncpg pool; ``relaxed_pool``: a small second pool whose commits do not wait
   for the WAL flush (``synchronous_commit = off``), for the writes whose loss in a PostgreSQL
   crash means at worst a repeated request: delivery leases and settles, and the journal (see
   docs/architecture.md#durability). Acknowledged events are committed through ``pool`` only;
2. ``http``: one shared ``CrmHttp`` (aiohttp's pool) for every RetailCRM account;
3. ``journal``: the ``integration_logs`` writer;
4. ``configs``: the enterprise config cache, then its first full load;
5. ``connections``: read, save, test, delete and register an enterprise's RetailCRM connection,
   and push its managers' extensions (the config and admin APIs call it), each journaled;
6. ``listener``: ``LISTEN integrations_changed``, keeping ``configs`` coherent;
7. ``pacer``: one request budget per RetailCRM API key, shared by delivery and lookups;
8. ``events`` (part ``"events"``): intake and the delivery workers;
9. ``asterisk`` (part ``"asterisk"``): the SSH pool;
10. ``call_control`` (with ``asterisk``): redirects and click-to-call as bounded background jobs
    of ``asterisk`` (drained when it closes), each journaled;
11. ``smart_redirect`` (part ``"smart_redirect"``): responsible-manager lookups.

Each component is handed its dependencies explicitly; none of them knows ``Runtime``. Routes reach
the runtime through the ``RuntimeDep`` dependency and a component through ``runtime.need_*()``,
which answers 503 when that part is not running (tests start only the parts they exercise).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, TypeVar

import asyncpg
from fastapi import Depends, Request

from retailcrm_service import __version__
from retailcrm_service.crm.client import CrmHttpClient, RetailCrmClient, http_client
from retailcrm_service.crm.connections import Connections
from retailcrm_service.crm.pacing import Pacer
from retailcrm_service.errors import ApiError
from retailcrm_service.ops.metrics import Metrics
from retailcrm_service.pipeline.intake import EventPipeline
from retailcrm_service.security.auth_failures import AuthFailures
from retailcrm_service.settings import Settings
from retailcrm_service.storage.enterprise_configs import ConfigCache, RetailCrmConfig
from retailcrm_service.storage.journal import IntegrationLogWriter, pg_purge, pg_sink
from retailcrm_service.telephony.asterisk_ssh import AsteriskControl
from retailcrm_service.telephony.call_control import CallControl
from retailcrm_service.telephony.smart_redirect import (
    EnterpriseTokens,
    InternalPhones,
    SmartRedirect,
    UserStatusBook,
)
from vochi_crm_client import Change, ChangeListener, ListenerSettings

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

EVENTS: Final = "events"
ASTERISK: Final = "asterisk"
SMART_REDIRECT: Final = "smart_redirect"
ALL_PARTS: Final = frozenset({EVENTS, ASTERISK, SMART_REDIRECT})

# The journal waits this long for more rows before an INSERT: a row shows in the admin UI at
# most this much later, and the database sees one statement per batch instead of per request.
JOURNAL_LINGER = 0.1
# Config keys whose change alters what the service reads (smart: smart-redirect settings).
_WATCHED_KEYS = frozenset({"*", "retailcrm", "smart"})


@dataclass(eq=False, kw_only=True)
class Runtime:
    """Everything one service instance owns; ``None`` fields are parts not started."""

    settings: Settings
    metrics: Metrics
    pool: asyncpg.Pool
    http: CrmHttpClient
    journal: IntegrationLogWriter
    configs: ConfigCache
    connections: Connections
    pacer: Pacer
    listener: ChangeListener | None = None
    events: EventPipeline | None = None
    asterisk: AsteriskControl | None = None
    call_control: CallControl | None = None
    smart_redirect: SmartRedirect | None = None
    statuses: UserStatusBook | None = None
    auth_failures: AuthFailures = field(default_factory=AuthFailures)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def logs(self) -> IntegrationLogWriter:
        """The ``integration_logs`` writer (the journal)."""
        return self.journal

    def retailcrm(
        self, config: RetailCrmConfig, *, timeout: float | None = None
    ) -> RetailCrmClient:
        """A client for the enterprise's account (the shared HTTP client, the key as a header)."""
        if config.api_key is None or not config.domain:
            raise ValueError(
                f"enterprise {config.enterprise_number} has no usable RetailCRM config"
            )
        return RetailCrmClient(
            domain=config.domain,
            api_key=config.api_key,
            http=self.http,
            timeout=self.settings.retailcrm_timeout if timeout is None else timeout,
        )

    def need_events(self) -> EventPipeline:
        return _running(self.events, "the event pipeline")

    def need_call_control(self) -> CallControl:
        return _running(self.call_control, "Asterisk control")

    def need_smart_redirect(self) -> SmartRedirect:
        return _running(self.smart_redirect, "smart redirect")

    def user_statuses(self) -> UserStatusBook:
        """The users' status book (smart redirect's, or one on the pool when it is not running)."""
        if self.statuses is None:
            self.statuses = UserStatusBook(pool=self.pool)
        return self.statuses

    def stats(self) -> dict[str, Any]:
        parts = {
            EVENTS: self.events,
            ASTERISK: self.asterisk,
            SMART_REDIRECT: self.smart_redirect,
        }
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "components": sorted(name for name, part in parts.items() if part is not None),
        }


def _running(part: _T | None, what: str) -> _T:
    if part is None:
        raise ApiError(503, "unavailable", f"{what} is not running")
    return part


def get_runtime(request: Request) -> Runtime:
    """FastAPI dependency: the running service's ``Runtime`` (503 while starting/stopping)."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ApiError(503, "unavailable", "the service is starting or stopping")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
"""Route parameter annotation: ``runtime: RuntimeDep``."""


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's release hook: nothing to send. asyncpg's default sends one more round trip per
    release (unlock advisory locks, CLOSE ALL, UNLISTEN, RESET ALL) to undo session state, and
    the service's pooled connections keep none (LISTEN has dedicated connections, the migration
    lock its own); a transaction left open is still rolled back by the pool itself."""


async def _open_listener(
    configs: ConfigCache, settings: Settings, tokens: EnterpriseTokens
) -> ChangeListener:
    def on_change(change: Change) -> None:
        if change.integration_type in _WATCHED_KEYS:
            configs.invalidate(change.enterprise_number)
        if change.integration_type == "*":  # inserts, deletes and token changes
            tokens.forget(change.enterprise_number)

    async def on_reload() -> None:
        await configs.refresh_all()

    return ChangeListener(
        dsn=settings.database_url.get_secret_value(),
        on_change=on_change,
        on_reload=on_reload,
        settings=ListenerSettings(application_name="retailcrm-service-listener"),
    )


@asynccontextmanager
async def open_runtime(
    settings: Settings, metrics: Metrics, *, parts: Collection[str] = ALL_PARTS
) -> AsyncIterator[Runtime]:
    """Open every part in the order of the module docstring; close them in reverse."""
    unknown = set(parts) - ALL_PARTS
    if unknown:
        raise ValueError(f"unknown runtime parts: {sorted(unknown)}")
    async with AsyncExitStack() as stack:
        pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            reset=keep_session,
        )
        stack.push_async_callback(pool.close)
        relaxed_pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=max(2, settings.db_pool_max_size // 2),
            reset=keep_session,
            server_settings={"synchronous_commit": "off"},
        )
        stack.push_async_callback(relaxed_pool.close)
        # Every RetailCRM request goes through this client: counted and timed by the metrics.
        http = await stack.enter_async_context(
            http_client(timeout=settings.retailcrm_timeout, observe=metrics.observe_crm)
        )
        journal = await stack.enter_async_context(
            IntegrationLogWriter(
                sink=pg_sink(relaxed_pool),
                linger=JOURNAL_LINGER,
                purge=pg_purge(pool),
                retention_days=settings.log_retention_days,
            )
        )
        configs = await stack.enter_async_context(
            ConfigCache(pool=pool, secret_key=settings.secret_key)
        )
        try:
            await configs.refresh_all()
        except Exception as exc:  # start degraded; the periodic reload retries
            logger.warning("runtime.initial_config_load_failed error=%s", type(exc).__name__)
        connections = Connections(
            settings=settings,
            metrics=metrics,
            pool=pool,
            http=http,
            journal=journal,
            configs=configs,
        )
        # The dialplan's Token cache, kept coherent by the listener; smart redirect uses it.
        tokens = EnterpriseTokens(pool=pool)
        listener = await stack.enter_async_context(await _open_listener(configs, settings, tokens))
        pacer = Pacer(config=settings.pipeline.delivery.pacing)
        runtime = Runtime(
            settings=settings,
            metrics=metrics,
            pool=pool,
            http=http,
            journal=journal,
            configs=configs,
            connections=connections,
            pacer=pacer,
            listener=listener,
        )
        _stats_source(stack, metrics, "service", runtime.stats)
        _stats_source(stack, metrics, "config_cache", configs.stats)
        _stats_source(stack, metrics, "integration_logs", journal.stats)
        _stats_source(stack, metrics, "listener", listener.stats)
        _stats_source(stack, metrics, "auth_failures", runtime.auth_failures.stats)
        if EVENTS in parts:
            runtime.events = await stack.enter_async_context(
                EventPipeline(
                    pool=pool,
                    delivery_pool=relaxed_pool,
                    configs=configs,
                    logs=journal,
                    http=http,
                    pacer=pacer,
                    outbox=settings.pipeline.outbox,
                    delivery=settings.pipeline.delivery,
                    registry=metrics.registry,
                    listen_dsn=settings.database_url.get_secret_value(),
                )
            )
            _stats_source(stack, metrics, "outbox", runtime.events.stats)
            logger.info("runtime.part_started name=%s", EVENTS)
        if ASTERISK in parts:
            runtime.asterisk = await stack.enter_async_context(
                AsteriskControl(settings=settings.asterisk)
            )
            runtime.call_control = CallControl(asterisk=runtime.asterisk, journal=journal)
            _stats_source(stack, metrics, "asterisk", runtime.asterisk.stats)
            logger.info("runtime.part_started name=%s", ASTERISK)
        if SMART_REDIRECT in parts:
            runtime.statuses = UserStatusBook(pool=pool)
            runtime.smart_redirect = await stack.enter_async_context(
                SmartRedirect(
                    configs=configs,
                    client_for=runtime.retailcrm,
                    internal_phones=InternalPhones(pool=pool),
                    statuses=runtime.statuses,
                    tokens=tokens,
                    pacer=pacer,
                    token_rate=settings.dialplan_rps,
                    token_burst=max(1, math.ceil(2 * settings.dialplan_rps)),
                )
            )
            _stats_source(stack, metrics, "smart_redirect", runtime.smart_redirect.stats)
            logger.info("runtime.part_started name=%s", SMART_REDIRECT)
        logger.info("runtime.started parts=%s", ",".join(sorted(parts)) or "-")
        yield runtime
        logger.info("runtime.stopping")


def _stats_source(stack: AsyncExitStack, metrics: Metrics, name: str, source: Any) -> None:
    metrics.add_source(name, source)
    stack.callback(metrics.remove_source, name)
