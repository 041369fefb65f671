"""Asterisk control over SSH: the only module of the service that speaks SSH.

Each enterprise's Asterisk host (``enterprises.ip``) is reached with ``asyncssh``: key
authentication only, host keys verified against a known_hosts file (an unknown key is refused),
one reused connection per host that is closed after it sits idle. Every operation runs one
``asterisk -rx "<cli command>"`` (docs/asterisk.md#ssh-commands). Every argument is validated
against a
strict pattern *and* the remote command line is built with ``shlex.join``, so no input can reach
the remote shell unquoted.

Exceptions::

    AsteriskError
     ├── InvalidArgument          (also a ValueError; raised before any network activity)
     ├── AsteriskUnavailable      (cannot connect or authenticate; the host is not reachable)
     │    └── HostKeyRejected     (the host's key is not in known_hosts)
     ├── AsteriskTimeout          (the command did not finish within its timeout)
     └── CommandFailed            (asterisk ran but reported an error)
          └── ChannelNotFound
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from vochi_crm_client import BackgroundTasks

logger = logging.getLogger(__name__)

__all__ = [
    "AsteriskControl",
    "AsteriskError",
    "AsteriskSettings",
    "AsteriskTimeout",
    "AsteriskUnavailable",
    "ChannelInfo",
    "ChannelNotFound",
    "CommandFailed",
    "CommandResult",
    "HostKeyRejected",
    "InvalidArgument",
    "originate_command",
    "parse_channels_concise",
    "redirect_command",
    "remote_command",
    "validate_channel",
    "validate_context",
    "validate_extension",
    "validate_host",
    "validate_phone",
]


# --------------------------------------------------------------------------- exceptions


class AsteriskError(Exception):
    """Base of every error raised by this module."""


class InvalidArgument(AsteriskError, ValueError):
    """An argument failed validation; nothing was sent anywhere."""


class AsteriskUnavailable(AsteriskError):
    """The host could not be reached, or refused our key."""


class HostKeyRejected(AsteriskUnavailable):
    """The host presented a key that known_hosts does not list for it."""


class AsteriskTimeout(AsteriskError):
    """The command did not complete within the command timeout."""


class CommandFailed(AsteriskError):
    """Asterisk ran the command and reported a failure."""

    def __init__(self, message: str, *, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class ChannelNotFound(CommandFailed):
    """The channel to act on no longer exists (the call ended or moved)."""


# --------------------------------------------------------------------------- validation

# Technology/resource, an optional 8-hex sequence suffix, and for Local channels the ;1/;2 half.
# Deliberately narrow: no spaces, quotes, commas, `$`, backslashes or shell metacharacters.
_CHANNEL_RE = re.compile(
    r"(?:SIP|PJSIP|IAX2|DAHDI|Local|LOCAL)/[A-Za-z0-9][A-Za-z0-9_.@+-]{0,79}(?:;[12])?",
)
_CONTEXT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")
_EXTENSION_RE = re.compile(r"[0-9]{2,5}")
_PHONE_RE = re.compile(r"\+?[0-9]{2,20}")
# Formatting a human may type around a number; removed before validation.
_PHONE_NOISE = str.maketrans("", "", " -().\t")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _check(pattern: re.Pattern[str], value: object, what: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidArgument(f"invalid {what}: {value!r}")
    return value


def validate_channel(value: object) -> str:
    """A channel name such as ``SIP/150-0000a1b2`` or ``Local/150@ctx-00000001;1``."""
    return _check(_CHANNEL_RE, value, "channel name")


def validate_context(value: object) -> str:
    """A dialplan context name: letters, digits, ``_`` and ``-``."""
    return _check(_CONTEXT_RE, value, "dialplan context")


def validate_extension(value: object) -> str:
    """An internal extension: 2 to 5 digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _check(_EXTENSION_RE, value, "extension")


def validate_phone(value: object) -> str:
    """A phone number: digits with an optional leading ``+``; spaces, dashes, dots and
    parentheses typed around it are removed first."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        value = value.strip().translate(_PHONE_NOISE)
    return _check(_PHONE_RE, value, "phone number")


def validate_host(value: object) -> str:
    """An IP address or a DNS host name (``enterprises.ip``)."""
    if isinstance(value, str):
        value = value.strip()
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
    return _check(_HOSTNAME_RE, value, "host")


def _validate_priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 999:
        raise InvalidArgument(f"invalid priority: {value!r}")
    return value


# --------------------------------------------------------------------------- commands


def redirect_command(channel: str, context: str, exten: str, priority: int = 1) -> str:
    """``channel redirect <channel> <context>,<exten>,<priority>`` with validated parts."""
    return (
        f"channel redirect {validate_channel(channel)} "
        f"{validate_context(context)},{validate_extension(exten)},{_validate_priority(priority)}"
    )


def originate_command(
    extension: str,
    phone: str,
    *,
    originate_context: str = "web-originate",
    dial_context: str = "inoffice",
) -> str:
    """The click-to-call: ring ``extension`` first, then dial ``phone`` from it."""
    return (
        f"channel originate LOCAL/{validate_extension(extension)}@"
        f"{validate_context(originate_context)} application Dial "
        f"LOCAL/{validate_phone(phone)}@{validate_context(dial_context)}"
    )


LIST_CHANNELS_COMMAND = "core show channels concise"


def remote_command(cli: str, *, binary: str = "asterisk") -> str:
    """The remote shell line: ``asterisk -rx '<cli>'``, quoted by ``shlex``."""
    return shlex.join([binary, "-rx", cli])


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """One line of ``core show channels concise``."""

    name: str
    context: str = ""
    exten: str = ""
    priority: str = ""
    state: str = ""
    application: str = ""
    data: str = ""
    caller_id: str = ""
    duration: int | None = None
    bridge_id: str = ""
    unique_id: str = ""


def parse_channels_concise(text: str) -> list[ChannelInfo]:
    """Parse ``core show channels concise`` (fields separated by ``!``)."""
    channels = []
    for line in text.splitlines():
        parts = line.strip().split("!")
        if len(parts) < 5 or "/" not in parts[0]:
            continue  # banners, blank lines, "N active channels" footers
        parts += [""] * (14 - len(parts))
        duration = int(parts[11]) if parts[11].isascii() and parts[11].isdigit() else None
        channels.append(
            ChannelInfo(
                name=parts[0],
                context=parts[1],
                exten=parts[2],
                priority=parts[3],
                state=parts[4],
                application=parts[5],
                data=parts[6],
                caller_id=parts[7],
                duration=duration,
                bridge_id=parts[12],
                unique_id=parts[13],
            )
        )
    return channels


@dataclass(frozen=True, slots=True)
class CommandResult:
    host: str
    command: str
    exit_status: int | None
    stdout: str
    stderr: str
    elapsed: float


# Asterisk's CLI exits 0 even when a command fails; these phrases mark its failures.
_FAILURE_MARKERS = ("no such command", "unable to", "failed to", "no such application", "usage:")


def _check_result(result: CommandResult) -> CommandResult:
    output = f"{result.stdout}\n{result.stderr}".lower()
    if "not found" in output or "no such channel" in output:
        raise ChannelNotFound(f"channel not found on {result.host}", result=result)
    if result.exit_status not in (0, None) or any(m in output for m in _FAILURE_MARKERS):
        raise CommandFailed(
            f"asterisk on {result.host} reported a failure (exit {result.exit_status})",
            result=result,
        )
    return result


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class AsteriskSettings:
    """How to reach the Asterisk hosts (``RETAILCRM_SSH_*``)."""

    user: str = "root"
    key_path: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    port: int = 22
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    idle_close: float = 60.0
    asterisk_binary: str = "asterisk"
    originate_context: str = "web-originate"
    dial_context: str = "inoffice"
    redirect_context: str = "inoffice"
    max_background: int = 100
    max_per_enterprise: int = 20
    host_breaker_failures: int = 2
    host_breaker_open: float = 15.0
    host_breaker_open_max: float = 300.0
    drain_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.user or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", self.user):
            raise ValueError(f"invalid SSH user: {self.user!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"invalid SSH port: {self.port}")
        if not self.known_hosts:
            raise ValueError("known_hosts is required: host keys are always verified")
        for name in (
            "connect_timeout",
            "command_timeout",
            "idle_close",
            "drain_timeout",
            "host_breaker_open",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.host_breaker_open_max < self.host_breaker_open:
            raise ValueError("host_breaker_open_max must be at least host_breaker_open")
        for name in ("max_background", "max_per_enterprise", "host_breaker_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("originate_context", "dial_context", "redirect_context"):
            validate_context(getattr(self, name))
        if not re.fullmatch(r"[A-Za-z0-9_./-]+", self.asterisk_binary):
            raise ValueError(f"invalid asterisk binary: {self.asterisk_binary!r}")


# --------------------------------------------------------------------------- the pool


@dataclass(eq=False)
class _HostSlot:
    """One host: its reused connection, and the breaker of its connection attempts.

    Connects to a host are serialised by ``lock``. A host that fails ``host_breaker_failures``
    connects in a row is marked down for ``host_breaker_open`` seconds (doubling on every
    failed probe up to ``host_breaker_open_max``): commands for it then fail at once instead of
    each waiting out a connect timeout, and once the period is over the next command is the
    probe. Commands that queued behind a connect that failed share its failure (``failures``
    moved while they waited) rather than each trying again.
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conn: asyncssh.SSHClientConnection | None = None
    last_used: float = 0.0
    in_use: int = 0
    failures: int = 0  # connect failures ever (a generation for the waiters)
    consecutive: int = 0
    trips: int = 0
    down_until: float = float("-inf")


Connector = Callable[..., Awaitable[asyncssh.SSHClientConnection]]


class AsteriskControl:
    """Runs Asterisk CLI commands on enterprise hosts over pooled SSH connections.

    Use as ``async with AsteriskControl(settings=...) as asterisk:``. Leaving the block stops
    intake of background jobs, waits for running ones up to ``drain_timeout``, cancels the rest
    and closes every connection.
    """

    def __init__(
        self,
        *,
        settings: AsteriskSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connector: Connector = asyncssh.connect,
    ) -> None:
        self.settings = settings or AsteriskSettings()
        self._clock = clock
        self._sleep = sleep
        self._connector = connector
        self._slots: dict[str, _HostSlot] = {}
        self._jobs = BackgroundTasks("asterisk-jobs", logger=logger)
        self._reaper = BackgroundTasks("asterisk-reaper", logger=logger)
        self._per_enterprise: dict[str, int] = {}
        self._accepting = False
        self.counters: dict[str, int] = {
            "connects": 0,
            "commands": 0,
            "failures": 0,
            "jobs_started": 0,
            "jobs_rejected": 0,
            "jobs_rejected_enterprise": 0,
            "host_down_refusals": 0,
        }

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsteriskControl:
        self._jobs.open()
        self._reaper.open()
        self._reaper.start(self._reap_idle, name="asterisk-idle-reaper")
        self._accepting = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._accepting = False
        try:
            # Jobs get drain_timeout to finish (a redirect mid-flight is worth completing).
            await self._jobs.close(grace=self.settings.drain_timeout)
            await self._reaper.close()
        finally:
            await self._close_all()

    # ------------------------------------------------------------------ operations

    async def redirect(
        self,
        host: str,
        channel: str,
        exten: str,
        *,
        context: str | None = None,
        priority: int = 1,
    ) -> CommandResult:
        """Move a live channel to ``context,exten,priority`` (default context ``inoffice``)."""
        cli = redirect_command(channel, context or self.settings.redirect_context, exten, priority)
        return _check_result(await self._run_cli(host, cli))

    async def originate(self, host: str, extension: str, phone: str) -> CommandResult:
        """Click-to-call: ring ``extension``; when answered, dial ``phone``."""
        cli = originate_command(
            extension,
            phone,
            originate_context=self.settings.originate_context,
            dial_context=self.settings.dial_context,
        )
        return _check_result(await self._run_cli(host, cli))

    async def list_channels(self, host: str) -> list[ChannelInfo]:
        result = _check_result(await self._run_cli(host, LIST_CHANNELS_COMMAND))
        return parse_channels_concise(result.stdout)

    async def show_channel(self, host: str, channel: str) -> str:
        """``core show channel <channel>``: Asterisk's description of one live channel."""
        cli = f"core show channel {validate_channel(channel)}"
        return _check_result(await self._run_cli(host, cli)).stdout

    async def _run_cli(self, host: str, cli: str) -> CommandResult:
        # Private: every caller builds ``cli`` from validated parts (see the operations above).
        host = validate_host(host)
        command = remote_command(cli, binary=self.settings.asterisk_binary)
        started = self._clock()
        self.counters["commands"] += 1
        try:
            completed = await self._run_with_reuse(host, command)
        except AsteriskError:
            self.counters["failures"] += 1
            raise
        result = CommandResult(
            host=host,
            command=cli,
            exit_status=completed.exit_status,
            stdout=_text(completed.stdout),
            stderr=_text(completed.stderr),
            elapsed=self._clock() - started,
        )
        logger.info(
            "asterisk.command host=%s command=%s exit=%s elapsed_ms=%.0f",
            host,
            cli.split(" ", 2)[:2],
            result.exit_status,
            result.elapsed * 1000,
        )
        return result

    # ------------------------------------------------------------------ background jobs

    def spawn(
        self, job: Coroutine[Any, Any, None], *, name: str, enterprise: str | None = None
    ) -> bool:
        """Run ``job`` in the background, owned by this object; False when refused.

        Refused when closed, when ``max_background`` jobs are already running, or when
        ``enterprise`` already has ``max_per_enterprise`` of them (so one enterprise's burst, or
        its dead host, cannot take every slot). The job must handle and record its own errors;
        anything it lets escape is logged (with its stack trace) by the owner of the jobs.
        """
        if not self._accepting or not self._jobs.is_open:
            job.close()
            self.counters["jobs_rejected"] += 1
            return False
        if self._jobs.running >= self.settings.max_background:
            job.close()
            self.counters["jobs_rejected"] += 1
            logger.warning("asterisk.job_rejected name=%s reason=too_many", name)
            return False
        if (
            enterprise is not None
            and self._per_enterprise.get(enterprise, 0) >= self.settings.max_per_enterprise
        ):
            job.close()
            self.counters["jobs_rejected"] += 1
            self.counters["jobs_rejected_enterprise"] += 1
            logger.warning(
                "asterisk.job_rejected name=%s enterprise=%s reason=enterprise_limit",
                name,
                enterprise,
            )
            return False
        if enterprise is None:
            self._jobs.start(_awaited, job, name=name)
        else:
            self._per_enterprise[enterprise] = self._per_enterprise.get(enterprise, 0) + 1
            self._jobs.start(self._counted, job, enterprise, name=name)
        self.counters["jobs_started"] += 1
        return True

    async def _counted(self, job: Coroutine[Any, Any, None], enterprise: str) -> None:
        try:
            await job
        finally:
            left = self._per_enterprise.get(enterprise, 0) - 1
            if left > 0:
                self._per_enterprise[enterprise] = left
            else:
                self._per_enterprise.pop(enterprise, None)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "open_connections": sum(
                1 for s in self._slots.values() if s.conn is not None and not s.conn.is_closed()
            ),
            "background_jobs": self._jobs.running,
            "hosts_down": sum(1 for s in self._slots.values() if s.down_until > self._clock()),
        }

    # ------------------------------------------------------------------ connections

    async def _run_with_reuse(self, host: str, command: str) -> asyncssh.SSHCompletedProcess:
        slot = self._slots.setdefault(host, _HostSlot())
        slot.in_use += 1
        try:
            conn, fresh = await self._connection(host, slot)
            try:
                return await self._exec(conn, command)
            except asyncssh.ChannelOpenError:
                if fresh:
                    raise AsteriskUnavailable(f"{host} refused a session") from None
                # A reused connection that died quietly: the command never started.
                await self._drop(slot, conn)
                conn, _ = await self._connection(host, slot)
                return await self._exec(conn, command)
        except asyncssh.ChannelOpenError as exc:
            raise AsteriskUnavailable(f"{host} refused a session") from exc
        except (asyncssh.DisconnectError, ConnectionError) as exc:
            await self._drop(slot, slot.conn)
            raise AsteriskUnavailable(f"connection to {host} lost") from exc
        finally:
            slot.in_use -= 1
            slot.last_used = self._clock()

    async def _exec(
        self, conn: asyncssh.SSHClientConnection, command: str
    ) -> asyncssh.SSHCompletedProcess:
        try:
            return await conn.run(command, check=False, timeout=self.settings.command_timeout)
        except asyncssh.TimeoutError as exc:
            raise AsteriskTimeout(
                f"command timed out after {self.settings.command_timeout:g} s"
            ) from exc

    async def _connection(
        self, host: str, slot: _HostSlot
    ) -> tuple[asyncssh.SSHClientConnection, bool]:
        failures_before = slot.failures
        async with slot.lock:
            if slot.conn is not None and not slot.conn.is_closed():
                return slot.conn, False
            if slot.failures != failures_before:
                # The connect this command queued behind failed: share its answer.
                self.counters["host_down_refusals"] += 1
                raise AsteriskUnavailable(f"{host} is unreachable (a connect just failed)")
            if self._clock() < slot.down_until:
                self.counters["host_down_refusals"] += 1
                raise AsteriskUnavailable(f"{host} is marked down after failed connects")
            try:
                slot.conn = await self._connect(host)
            except AsteriskUnavailable:
                self._connect_failed(host, slot)
                raise
            slot.consecutive = 0
            slot.trips = 0
            slot.down_until = float("-inf")
            return slot.conn, True

    def _connect_failed(self, host: str, slot: _HostSlot) -> None:
        s = self.settings
        slot.failures += 1
        slot.consecutive += 1
        if slot.trips or slot.consecutive >= s.host_breaker_failures:
            # Past the threshold, or a failed probe after a down period: (again) down, longer.
            period = min(s.host_breaker_open_max, s.host_breaker_open * 2 ** min(slot.trips, 16))
            slot.trips += 1
            slot.down_until = self._clock() + period
            logger.warning("asterisk.host_down host=%s for_s=%.0f", host, period)

    def _connect_options(self) -> dict[str, Any]:
        s = self.settings
        known_hosts = os.path.expanduser(s.known_hosts)
        if not os.access(known_hosts, os.R_OK):
            # Never fall back to "no verification": asyncssh treats known_hosts=None that way.
            raise HostKeyRejected(f"known_hosts file {s.known_hosts!r} is not readable")
        return {
            "port": s.port,
            "username": s.user,
            "known_hosts": known_hosts,
            "client_keys": [os.path.expanduser(s.key_path)] if s.key_path else (),
            "agent_path": None,
            "password": None,
            "preferred_auth": "publickey",
            "config": [],
            "connect_timeout": s.connect_timeout,
            "login_timeout": s.connect_timeout,
            "keepalive_interval": 30,
        }

    async def _connect(self, host: str) -> asyncssh.SSHClientConnection:
        s = self.settings
        options = self._connect_options()
        try:
            async with asyncio.timeout(s.connect_timeout):
                conn = await self._connector(host, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            logger.error("asterisk.host_key_rejected host=%s", host)
            raise HostKeyRejected(f"host key of {host} is not trusted") from exc
        except asyncssh.PermissionDenied as exc:
            logger.error("asterisk.auth_failed host=%s user=%s", host, s.user)
            raise AsteriskUnavailable(f"{host} refused our key") from exc
        except TimeoutError as exc:
            raise AsteriskUnavailable(f"connecting to {host} timed out") from exc
        except (asyncssh.Error, OSError, ValueError) as exc:
            # ValueError: asyncssh's KeyImportError for an unreadable or malformed client key.
            raise AsteriskUnavailable(f"cannot connect to {host}: {type(exc).__name__}") from exc
        self.counters["connects"] += 1
        logger.info("asterisk.connected host=%s port=%s", host, s.port)
        return conn

    async def _drop(self, slot: _HostSlot, conn: asyncssh.SSHClientConnection | None) -> None:
        if conn is None:
            return
        if slot.conn is conn:
            slot.conn = None
        conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.wait_closed(), 1.0)

    async def _reap_idle(self) -> None:
        interval = max(self.settings.idle_close / 2, 0.05)
        while True:
            await self._sleep(interval)
            await self.close_idle()

    async def close_idle(self) -> int:
        """Close connections idle for at least ``idle_close`` seconds; returns how many."""
        now = self._clock()
        closed = 0
        for host, slot in list(self._slots.items()):
            conn = slot.conn
            if conn is None or slot.in_use or now - slot.last_used < self.settings.idle_close:
                continue
            await self._drop(slot, conn)
            closed += 1
            logger.info("asterisk.idle_closed host=%s", host)
        return closed

    async def _close_all(self) -> None:
        for slot in self._slots.values():
            await self._drop(slot, slot.conn)
        self._slots.clear()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


async def _awaited(job: Coroutine[Any, Any, None]) -> None:
    await job
