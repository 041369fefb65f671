"""LISTEN integrations_changed on a dedicated connection, with reconnects and a heartbeat.

Public names (re-exported by ``vochi_crm_client``)::

    ListenerSettings(*, channel="integrations_changed", heartbeat_interval=30.0,
                     heartbeat_timeout=90.0, connect_timeout=10.0,
                     reconnect=BackoffPolicy(base=0.5, cap=30.0),
                     reload_retry=BackoffPolicy(base=1.0, cap=60.0),
                     application_name="vochi-crm-listener")          # frozen, validated
    Change(enterprise_number: str, integration_type: str)            # "*": every integration
    parse_change(payload: str) -> Change | None                      # None: heartbeat / foreign
    ListenerState: IDLE, CONNECTING, LISTENING, BACKOFF, CLOSED

    ChangeListener(*, dsn: str, on_change: Callable[[Change], None],
                   on_reload: Callable[[], Awaitable[None]],
                   settings: ListenerSettings = ListenerSettings(),
                   clock=time.monotonic, sleep=asyncio.sleep, rng=random.Random())
        async with listener: ...           # owns the connection, heartbeat and reload tasks
        listener.state -> ListenerState
        listener.backend_pid -> int | None # server pid of the LISTEN connection
        await listener.wait_listening()    # until LISTEN is active (no timeout: wrap it)
        listener.request_reload()          # ask for one more (debounced) on_reload
        listener.stats() -> dict           # keys: LISTENER_STATS_KEYS

Behaviour: the connection is opened with ``asyncpg.connect`` (never from a pool: a pooled
connection's reset runs ``UNLISTEN *``). After every (re)connect, LISTEN first, then a full
``on_reload`` (notifications sent while we were away are lost). Reconnects wait
``delay(attempt, settings.reconnect, rng)``. ``on_change`` runs synchronously for each change
notification; a notification that lands while ``on_reload`` runs causes exactly one more reload
afterwards, however many land (debounced, the last request is never dropped). A failed reload
is retried with ``reload_retry`` backoff while connected.

Heartbeat: every ``heartbeat_interval`` the listener sends, on its own connection,
``pg_notify(channel, '{"heartbeat": "<listener id>", "sent_at": <unix time>}')``. Heartbeats
have no ``enterprise_number`` key, which is how every consumer (``parse_change``) tells them
apart and ignores them. A listener counts only its own heartbeats; if none has come back for
``heartbeat_timeout`` it treats the connection as dead and reconnects.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from ._backoff import BackoffPolicy, SupportsRandom, delay
from ._cache import Clock, Sleep
from ._exceptions import LoadError, StateError
from ._tasks import BackgroundTasks, log_unexpected

__all__ = [
    "LISTENER_STATS_KEYS",
    "Change",
    "ChangeListener",
    "ListenerSettings",
    "ListenerState",
    "parse_change",
]

logger = logging.getLogger(__name__)

LISTENER_STATS_KEYS: Final = (
    "state",
    "channel",
    "connects",
    "disconnects",
    "connect_errors",
    "notifications",
    "heartbeats_sent",
    "heartbeats_received",
    "heartbeat_age",
    "reloads",
    "reload_errors",
    "last_error",
)


class ListenerState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    LISTENING = "listening"
    BACKOFF = "backoff"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change of an enterprise; ``integration_type`` "*" means all of them."""

    enterprise_number: str
    integration_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerSettings:
    """Tunables of a ChangeListener; durations in seconds."""

    channel: str = "integrations_changed"
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 90.0
    connect_timeout: float = 10.0
    reconnect: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(base=0.5, cap=30.0))
    reload_retry: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(base=1.0, cap=60.0))
    application_name: str = "vochi-crm-listener"

    def __post_init__(self) -> None:
        if not self.channel.isidentifier():
            raise ValueError(f"ListenerSettings.channel must be an identifier: {self.channel!r}")
        for name in ("heartbeat_interval", "heartbeat_timeout", "connect_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ListenerSettings.{name} must be a finite number > 0")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("ListenerSettings.heartbeat_timeout must exceed heartbeat_interval")


def parse_change(payload: str) -> Change | None:
    """The change a payload announces; None for heartbeats and anything else not a change.

    Raises ValueError for a payload that is not JSON at all.
    """
    data = json.loads(payload)
    if not isinstance(data, dict):
        return None
    number = data.get("enterprise_number")
    if not isinstance(number, str):
        return None
    kind = data.get("integration_type")
    return Change(number, kind if isinstance(kind, str) else "*")


class ChangeListener:
    """A dedicated LISTEN connection that keeps a cache coherent; see the module docstring."""

    def __init__(
        self,
        *,
        dsn: str,
        on_change: Callable[[Change], None],
        on_reload: Callable[[], Awaitable[None]],
        settings: ListenerSettings | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: SupportsRandom | None = None,
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._on_reload = on_reload
        self.settings = settings if settings is not None else ListenerSettings()
        self._clock = clock
        self._sleep = sleep
        self._rng: SupportsRandom = rng if rng is not None else random.Random()
        self._id = secrets.token_hex(6)
        self._state = ListenerState.IDLE
        self._tasks = BackgroundTasks(f"listener {self.settings.channel}", logger=logger)
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._listening = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reloading = False
        self._proof_at: float | None = None  # connect time, then each heartbeat's return
        self._last_heartbeat: float | None = None
        self._counts = dict.fromkeys(
            (
                "connects",
                "disconnects",
                "connect_errors",
                "notifications",
                "heartbeats_sent",
                "heartbeats_received",
                "reloads",
                "reload_errors",
            ),
            0,
        )
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"<ChangeListener {self.settings.channel!r} {self._state.value}>"

    @property
    def state(self) -> ListenerState:
        return self._state

    @property
    def backend_pid(self) -> int | None:
        conn = self._conn
        return None if conn is None else int(conn.get_server_pid())

    async def wait_listening(self) -> None:
        """Return once LISTEN is active on a live connection."""
        if self._state is ListenerState.CLOSED:
            raise StateError("listener is closed")
        await self._listening.wait()

    def request_reload(self) -> None:
        """Ask for one more full reload; requests made while one runs collapse into one."""
        self._reload_wanted.set()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> ChangeListener:
        if self._state is not ListenerState.IDLE:
            raise StateError("a listener can be opened only once")
        self._tasks.open()
        self._state = ListenerState.CONNECTING
        self._tasks.start(self._supervise, name="listener-connection")
        self._tasks.start(self._heartbeat_forever, name="listener-heartbeat")
        self._tasks.start(self._reload_forever, name="listener-reload")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Nothing to drain: notifications are hints and reloads are idempotent.
        self._state = ListenerState.CLOSED
        await self._tasks.close()

    # -- connection ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            self._state = ListenerState.CONNECTING
            conn = await self._connect()
            if conn is None:
                attempt += 1
                await self._backoff(attempt)
                continue
            attempt = 0
            try:
                await self._serve(conn)
            finally:
                await self._drop(conn)
            self._counts["disconnects"] += 1
            logger.warning("listener.disconnected channel=%s", self.settings.channel)
            await self._backoff(1)

    async def _connect(self) -> Any:
        s = self.settings
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=s.connect_timeout,
                server_settings={"application_name": s.application_name},
            )
        except Exception as exc:
            self._note_error("listener.connect_failed", exc)
            self._counts["connect_errors"] += 1
            return None
        try:
            async with asyncio.timeout(s.connect_timeout):
                await conn.add_listener(s.channel, self._on_notification)
        except Exception as exc:
            self._note_error("listener.listen_failed", exc)
            self._counts["connect_errors"] += 1
            conn.terminate()
            return None
        except asyncio.CancelledError:
            conn.terminate()
            raise
        return conn

    async def _serve(self, conn: Any) -> None:
        # A fresh event per connection: a late callback of an old one must not hit the new one.
        lost = self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        self._conn = conn
        self._proof_at = self._clock()
        self._state = ListenerState.LISTENING
        self._counts["connects"] += 1
        self._listening.set()
        logger.info("listener.listening channel=%s", self.settings.channel)
        self.request_reload()  # whatever changed while we were not listening was missed
        await lost.wait()

    async def _drop(self, conn: Any) -> None:
        self._listening.clear()
        self._conn = None
        if self._state is not ListenerState.CLOSED:
            self._state = ListenerState.BACKOFF
        if conn.is_closed():
            return
        try:
            await conn.close(timeout=self.settings.connect_timeout)
        except Exception:
            conn.terminate()
        except asyncio.CancelledError:
            conn.terminate()
            raise

    async def _backoff(self, attempt: int) -> None:
        self._state = ListenerState.BACKOFF
        await self._sleep(delay(attempt, self.settings.reconnect, self._rng))

    def _note_error(self, event: str, exc: BaseException) -> None:
        # Only the class: driver messages may carry the DSN.
        self._last_error = type(exc).__name__
        logger.warning("%s channel=%s error=%s", event, self.settings.channel, self._last_error)

    # -- notifications ---------------------------------------------------------------------

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            change = parse_change(payload)
        except ValueError:
            logger.warning("listener.bad_payload channel=%s", self.settings.channel)
            self.request_reload()  # something changed, we cannot tell what: reload it all
            return
        if change is None:
            self._maybe_own_heartbeat(payload)
            return
        self._counts["notifications"] += 1
        if self._reloading:
            self.request_reload()  # the running reload may have read the state before this
        try:
            self._on_change(change)
        except Exception as exc:  # a bug of the consumer: the listener carries on
            log_unexpected(logger, "listener.on_change_failed", exc, channel=self.settings.channel)

    def _maybe_own_heartbeat(self, payload: str) -> None:
        data = json.loads(payload)
        if isinstance(data, dict) and data.get("heartbeat") == self._id:
            self._counts["heartbeats_received"] += 1
            self._last_heartbeat = self._proof_at = self._clock()

    async def _heartbeat_forever(self) -> None:
        s = self.settings
        while True:
            await self._sleep(s.heartbeat_interval)
            conn = self._conn
            if conn is None or self._state is not ListenerState.LISTENING:
                continue
            if self._proof_at is not None and self._clock() - self._proof_at > s.heartbeat_timeout:
                logger.warning("listener.heartbeat_lost channel=%s", s.channel)
                self._lost.set()
                continue
            payload = json.dumps({"heartbeat": self._id, "sent_at": round(time.time(), 3)})
            try:
                async with asyncio.timeout(s.connect_timeout):
                    await conn.execute("SELECT pg_notify($1, $2)", s.channel, payload)
            except Exception as exc:
                self._note_error("listener.heartbeat_failed", exc)
                self._lost.set()
            else:
                self._counts["heartbeats_sent"] += 1

    # -- reloads ---------------------------------------------------------------------------

    async def _reload_forever(self) -> None:
        attempt = 0
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            self._reloading = True
            try:
                await self._on_reload()
            except Exception as exc:
                self._counts["reload_errors"] += 1
                self._note_error("listener.reload_failed", exc)
                if not isinstance(exc, LoadError):  # not a failed load: a bug, keep its trace
                    log_unexpected(
                        logger, "listener.reload_error", exc, channel=self.settings.channel
                    )
                attempt += 1
                await self._sleep(delay(attempt, self.settings.reload_retry, self._rng))
                if self._state is ListenerState.LISTENING:
                    self.request_reload()
            else:
                attempt = 0
                self._counts["reloads"] += 1
            finally:
                self._reloading = False

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable; ``heartbeat_age`` is seconds since our last heartbeat returned."""
        last = self._last_heartbeat
        return {
            "state": self._state.value,
            "channel": self.settings.channel,
            **self._counts,
            "heartbeat_age": None if last is None else round(self._clock() - last, 3),
            "last_error": self._last_error,
        }
