"""Smart redirect: which manager should an incoming call ring first, decided within a deadline.

The responsible manager comes from RetailCRM's ``telephony/manager`` (asked with the enterprise's
own account), falling back to the customer's manager and then to the manager of the customer's
latest order. The enterprise's local ``user_extensions`` mapping wins over RetailCRM's
``manager.code``; the extension maps to ``user_internal_phones.id``, which names the dialplan
context ``mngr<id>_<trunk>_1`` (platform-facts.md §4).

Real-time rules: every decision is bounded by a hard deadline (default 300 ms) and fails open
(no redirect) past it. CRM lookups are single-flight per (enterprise, phone), run as tasks owned by
``SmartRedirect`` (an ``async with`` object), and keep running after a deadline so that the answer
lands in the cache for the caller's next try. Answers are cached per enterprise: found managers
for minutes, "nobody" for less, errors for seconds. Lookups are paced with the shared ``Pacer``
(``telephony/manager`` counts against the 40 req/s telephony budget).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from retailcrm_service.asterisk import InvalidArgument, validate_context
from retailcrm_service.pacing import Pacer

if TYPE_CHECKING:
    from retailcrm_service.config import RetailCrmConfig

logger = logging.getLogger(__name__)

USER_STATUSES = frozenset({"free", "busy", "dinner", "break"})
MAX_NAME_CHARS = 48
_TRUNK_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")


# --------------------------------------------------------------------------- pure helpers


def sanitize_name(value: object) -> str:
    """A caller label the dialplan macro can cut safely: never None, no ``,`` ``"`` ``\\``,
    no control characters, single spaces, at most ``MAX_NAME_CHARS``."""
    if not isinstance(value, str):
        return ""
    kept = [" " if ch in ',"\\' or unicodedata.category(ch).startswith("C") else ch for ch in value]
    return " ".join("".join(kept).split())[:MAX_NAME_CHARS].strip()


def person_name(entity: Mapping[str, Any] | None) -> str:
    """``"Last First"`` of a RetailCRM user or customer, sanitised."""
    if not entity:
        return ""
    parts = [entity.get("lastName"), entity.get("firstName")]
    return sanitize_name(" ".join(str(p) for p in parts if p))


def phone_key(phone: object) -> str:
    """The digits of a phone number: how it is cached and compared."""
    if not isinstance(phone, (str, int)) or isinstance(phone, bool):
        return ""
    return "".join(ch for ch in str(phone) if ch.isdigit())


def dialplan_context(internal_phone_id: int | None, trunk: object) -> str | None:
    """``mngr<user_internal_phones.id>_<trunk>_1``, or None when either part is unusable."""
    if internal_phone_id is None or not isinstance(trunk, str) or not _TRUNK_RE.fullmatch(trunk):
        return None
    context = f"mngr{int(internal_phone_id)}_{trunk}_1"
    try:
        return validate_context(context)
    except InvalidArgument:
        return None


def dialplan_reply(name: str, dialplan: str | None) -> bytes:
    """The compact JSON the dialplan macro parses: ``Name`` first, never null."""
    body = {"Name": sanitize_name(name), "DialPlan": dialplan}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


# --------------------------------------------------------------------------- options


def _flag(value: object, default: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    return default


def _number(value: object, default: float, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return min(high, max(low, float(value)))


@dataclass(frozen=True, slots=True)
class SmartOptions:
    """An enterprise's smart-redirect settings (``integrations_config`` ``smart`` /
    ``retailcrm.smart_redirect``), with defaults and clamps."""

    mode: str = "routing"  # "off" | "name-only" | "routing"
    redirect_channel: bool = False
    redirect_context: str = "inoffice"
    deadline: float = 0.3
    positive_ttl: float = 300.0
    negative_ttl: float = 30.0
    error_ttl: float = 5.0
    respect_status: bool = True

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> SmartOptions:
        raw = raw or {}
        mode = str(raw.get("mode") or "routing").strip().lower()
        if mode not in {"off", "name-only"}:
            mode = "routing"  # also "routing+name", "on" and anything unknown
        if raw.get("enabled") is False:
            mode = "off"
        context = raw.get("redirect_context")
        try:
            context = validate_context(context) if context else "inoffice"
        except InvalidArgument:
            context = "inoffice"
        return cls(
            mode=mode,
            redirect_channel=_flag(raw.get("redirect_channel"), False),
            redirect_context=context,
            deadline=_number(raw.get("deadline_ms"), 300, 20, 2000) / 1000,
            positive_ttl=_number(raw.get("cache_ttl_s"), 300, 1, 3600),
            negative_ttl=_number(raw.get("negative_ttl_s"), 30, 1, 600),
            respect_status=_flag(raw.get("respect_status"), True),
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Lookup:
    """What RetailCRM says about a phone (the cached part of a decision)."""

    source: str  # telephony_manager | customer | order | none | error
    manager_id: int | None = None
    manager_code: str | None = None
    manager_name: str = ""
    customer_name: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """Where to route one call, and why."""

    source: str
    extension: str | None = None
    manager_id: int | None = None
    manager_name: str = ""
    name: str = ""
    internal_phone_id: int | None = None
    dialplan: str | None = None
    cached: bool = False
    enterprise_number: str | None = None
    redirect_channel: bool = False
    redirect_context: str = "inoffice"
    host: str | None = None

    def as_reply(self) -> bytes:
        return dialplan_reply(self.name, self.dialplan)


# --------------------------------------------------------------------------- collaborators


class CrmLookup(Protocol):
    """The parts of ``RetailCrmClient`` smart redirect uses."""

    async def telephony_manager(
        self, phone: str, *, details: bool = ..., ignore_status: bool = ...
    ) -> dict[str, Any]: ...

    async def customers(
        self, *, filters: Mapping[str, Any] | None = ..., limit: int = ..., page: int = ...
    ) -> dict[str, Any]: ...

    async def orders(
        self, *, filters: Mapping[str, Any] | None = ..., limit: int = ..., page: int = ...
    ) -> dict[str, Any]: ...


class ConfigSource(Protocol):
    async def get(self, number: str) -> RetailCrmConfig | None: ...


@dataclass(slots=True)
class _Entry:
    value: Any
    expires: float


class _TtlMap:
    """A bounded dict with per-entry expiry (oldest evicted first)."""

    def __init__(self, *, clock: Callable[[], float], max_entries: int) -> None:
        self._clock = clock
        self._max = max_entries
        self._data: dict[Any, _Entry] = {}

    def get(self, key: Any) -> Any | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._data.pop(key, None)
            return None
        return entry.value

    def put(self, key: Any, value: Any, ttl: float) -> None:
        self._data.pop(key, None)
        while len(self._data) >= self._max:
            self._data.pop(next(iter(self._data)))
        self._data[key] = _Entry(value, self._clock() + ttl)

    def discard_where(self, predicate: Callable[[Any], bool]) -> None:
        for key in [k for k in self._data if predicate(k)]:
            self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


class UserStatusBook:
    """Users' statuses reported by RetailCRM (``/retailcrm/status``), in ``retailcrm_user_status``.

    Reads are cached for ``ttl`` seconds; this instance's own writes are visible at once.
    """

    def __init__(
        self, *, pool: asyncpg.Pool, clock: Callable[[], float] = time.monotonic, ttl: float = 2.0
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._cache = _TtlMap(clock=clock, max_entries=50_000)

    async def record(
        self, enterprise_number: str, user_id: str, status: str, *, code: str | None = None
    ) -> None:
        if status not in USER_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        await self._pool.execute(
            """INSERT INTO retailcrm_user_status
                   (enterprise_number, retailcrm_user_id, code, status, updated_at)
               VALUES ($1, $2, $3, $4, now())
               ON CONFLICT (enterprise_number, retailcrm_user_id)
               DO UPDATE SET code = COALESCE(EXCLUDED.code, retailcrm_user_status.code),
                             status = EXCLUDED.status, updated_at = now()""",
            enterprise_number,
            user_id,
            code,
            status,
        )
        self._cache.put((enterprise_number, user_id), status, self._ttl)

    async def get(self, enterprise_number: str, user_id: str) -> str | None:
        """The last reported status, or None when RetailCRM never told us."""
        key = (enterprise_number, user_id)
        cached = self._cache.get(key)
        if cached is not None:
            return str(cached) or None
        status = await self._pool.fetchval(
            """SELECT status FROM retailcrm_user_status
               WHERE enterprise_number = $1 AND retailcrm_user_id = $2""",
            enterprise_number,
            user_id,
        )
        self._cache.put(key, status or "", self._ttl)
        return status

    async def all_for(self, enterprise_number: str) -> dict[str, str]:
        rows = await self._pool.fetch(
            """SELECT retailcrm_user_id, status FROM retailcrm_user_status
               WHERE enterprise_number = $1""",
            enterprise_number,
        )
        return {r["retailcrm_user_id"]: r["status"] for r in rows}


class InternalPhones:
    """``user_internal_phones``: extension -> id per enterprise, cached for ``ttl`` seconds."""

    def __init__(
        self, *, pool: asyncpg.Pool, clock: Callable[[], float] = time.monotonic, ttl: float = 60.0
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._cache = _TtlMap(clock=clock, max_entries=10_000)

    async def id_of(self, enterprise_number: str, extension: str) -> int | None:
        table = self._cache.get(enterprise_number)
        if table is None:
            rows = await self._pool.fetch(
                """SELECT phone_number, min(id) AS id FROM user_internal_phones
                   WHERE enterprise_number = $1 GROUP BY phone_number""",
                enterprise_number,
            )
            table = {r["phone_number"]: int(r["id"]) for r in rows}
            self._cache.put(enterprise_number, table, self._ttl)
        value = table.get(extension)
        return int(value) if value is not None else None


class EnterpriseTokens:
    """The dialplan's ``Token`` header -> ``enterprises.number`` (name2, secret or number)."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = 300.0,
        negative_ttl: float = 30.0,
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._cache = _TtlMap(clock=clock, max_entries=20_000)

    async def resolve(self, token: str) -> str | None:
        token = token.strip()
        if not token or len(token) > 128:
            return None
        # Keyed by digest: the cache must not become a second copy of the secrets.
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is not None:
            return str(cached) or None
        number = await self._pool.fetchval(
            """SELECT number FROM enterprises
               WHERE name2 = $1 OR secret = $1 OR number = $1
               ORDER BY COALESCE(name2 = $1, false) DESC, COALESCE(secret = $1, false) DESC
               LIMIT 1""",
            token,
        )
        self._cache.put(key, number or "", self._ttl if number else self._negative_ttl)
        return number


# --------------------------------------------------------------------------- the service


ClientFactory = Callable[["RetailCrmConfig"], CrmLookup]


def _credentials_id(config: RetailCrmConfig) -> str:
    key = config.api_key.get_secret_value() if config.api_key else ""
    return hashlib.sha256(f"{config.domain}\n{key}".encode()).hexdigest()[:16]


class SmartRedirect:
    """Decides smart redirects; use as ``async with SmartRedirect(...) as smart``."""

    def __init__(
        self,
        *,
        configs: ConfigSource,
        client_for: ClientFactory,
        internal_phones: InternalPhones | Callable[[str, str], Awaitable[int | None]],
        statuses: UserStatusBook | None = None,
        pacer: Pacer | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 50_000,
        default_deadline: float = 0.3,
        lookup_timeout: float = 10.0,
        drain_timeout: float = 3.0,
    ) -> None:
        self._configs = configs
        self._client_for = client_for
        self._phone_id = (
            internal_phones.id_of
            if isinstance(internal_phones, InternalPhones)
            else internal_phones
        )
        self._statuses = statuses
        self._pacer = pacer
        self._clock = clock
        self._cache = _TtlMap(clock=clock, max_entries=max_entries)
        self._inflight: dict[tuple[str, str, str], asyncio.Task[Lookup]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._lookup_timeout = lookup_timeout
        self._default_deadline = default_deadline
        self._drain_timeout = drain_timeout
        self.statuses = statuses
        self.tokens: EnterpriseTokens | None = None
        self.counters: dict[str, int] = {
            "decisions": 0,
            "cache_hits": 0,
            "lookups": 0,
            "timeouts": 0,
            "errors": 0,
        }

    async def __aenter__(self) -> SmartRedirect:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        group, self._group = self._group, None
        pending = set(self._inflight.values())
        if pending:
            _done, late = await asyncio.wait(pending, timeout=self._drain_timeout)
            for task in late:
                task.cancel()
        if group is not None:
            await group.__aexit__(None, None, None)

    def forget(self, enterprise_number: str) -> None:
        """Drop cached answers of one enterprise (its config changed)."""
        self._cache.discard_where(lambda key: key[0] == enterprise_number)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "cached": len(self._cache), "inflight": len(self._inflight)}

    # ------------------------------------------------------------------ deciding

    async def decide(
        self, enterprise_number: str, phone: str, *, trunk: str | None = None
    ) -> Decision:
        """The routing decision for one incoming call; never raises for CRM or DB trouble."""
        self.counters["decisions"] += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = Decision(source="error", enterprise_number=enterprise_number)
        try:
            # The default deadline covers the config read; the enterprise's own then applies.
            async with asyncio.timeout(self._default_deadline) as deadline:
                config = await self._configs.get(enterprise_number)
                options = SmartOptions.from_mapping(config.smart_redirect if config else None)
                deadline.reschedule(started + options.deadline)
                outcome = replace(
                    outcome,
                    redirect_channel=options.redirect_channel,
                    redirect_context=options.redirect_context,
                    host=config.ip if config else None,
                )
                if config is None:
                    return replace(outcome, source="unknown_enterprise")
                if not config.is_on or options.mode == "off":
                    return replace(outcome, source="disabled")
                digits = phone_key(phone)
                if len(digits) < 5:
                    return replace(outcome, source="invalid_phone")
                return await self._decide(config, options, digits, trunk, outcome)
        except TimeoutError:
            self.counters["timeouts"] += 1
            logger.warning(
                "smart_redirect.deadline enterprise=%s elapsed_ms=%.0f",
                enterprise_number,
                (loop.time() - started) * 1000,
            )
            return replace(outcome, source="timeout")
        except Exception as exc:  # fail open: the call goes on without a redirect
            self.counters["errors"] += 1
            logger.warning(
                "smart_redirect.failed enterprise=%s error=%s",
                enterprise_number,
                type(exc).__name__,
            )
            return replace(outcome, source="error")

    async def _decide(
        self,
        config: RetailCrmConfig,
        options: SmartOptions,
        digits: str,
        trunk: str | None,
        base: Decision,
    ) -> Decision:
        key = (config.enterprise_number, _credentials_id(config), digits)
        found = self._cache.get(key)
        cached = found is not None
        if cached:
            self.counters["cache_hits"] += 1
        else:
            found = await asyncio.shield(self._lookup_task(key, config, options))
        assert isinstance(found, Lookup)
        decision = replace(
            base,
            source=found.source,
            manager_id=found.manager_id,
            manager_name=found.manager_name,
            name=found.customer_name,
            cached=cached,
        )
        if found.manager_id is None:
            return decision
        # The local mapping wins over the code RetailCRM knows.
        local = config.user_extensions.get(str(found.manager_id))
        extension = local or found.manager_code
        if not extension:
            return replace(decision, source="unmapped")
        decision = replace(decision, extension=extension)
        if options.respect_status and self._statuses is not None:
            status = await self._statuses.get(config.enterprise_number, str(found.manager_id))
            if status is not None and status != "free":
                return replace(decision, source=f"manager_{status}", extension=None)
        if options.mode != "routing":
            return decision
        phone_id = await self._phone_id(config.enterprise_number, extension)
        return replace(
            decision, internal_phone_id=phone_id, dialplan=dialplan_context(phone_id, trunk)
        )

    # ------------------------------------------------------------------ CRM lookups

    def _lookup_task(
        self, key: tuple[str, str, str], config: RetailCrmConfig, options: SmartOptions
    ) -> asyncio.Task[Lookup]:
        task = self._inflight.get(key)
        if task is not None:
            return task
        if self._group is None:
            raise RuntimeError("SmartRedirect is not open (use `async with`)")
        task = self._group.create_task(self._run_lookup(key, config, options), name="smart-lookup")
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return task

    async def _run_lookup(
        self, key: tuple[str, str, str], config: RetailCrmConfig, options: SmartOptions
    ) -> Lookup:
        self.counters["lookups"] += 1
        try:
            async with asyncio.timeout(self._lookup_timeout):
                found = await self._ask_crm(config, key[2])
        except Exception as exc:  # the task boundary: nothing may escape into the group
            self.counters["errors"] += 1
            logger.warning(
                "smart_redirect.lookup_failed enterprise=%s error=%s",
                config.enterprise_number,
                type(exc).__name__,
            )
            found = Lookup(source="error")
            self._cache.put(key, found, options.error_ttl)
            return found
        ttl = options.positive_ttl if found.manager_id is not None else options.negative_ttl
        self._cache.put(key, found, ttl)
        return found

    async def _paced(self, config: RetailCrmConfig, method: str) -> None:
        if self._pacer is not None and config.api_key is not None:
            await self._pacer.acquire(config.api_key.get_secret_value(), method)

    async def _ask_crm(self, config: RetailCrmConfig, digits: str) -> Lookup:
        client = self._client_for(config)
        await self._paced(config, "telephony/manager")
        body = await client.telephony_manager(digits, details=True, ignore_status=True)
        customer = body.get("customer") if isinstance(body.get("customer"), Mapping) else None
        manager = body.get("manager") if isinstance(body.get("manager"), Mapping) else None
        customer_name = person_name(customer)
        if manager is not None and _as_int(manager.get("id")) is not None:
            code = manager.get("code")
            return Lookup(
                source="telephony_manager",
                manager_id=_as_int(manager.get("id")),
                manager_code=str(code) if code not in (None, "") else None,
                manager_name=person_name(manager),
                customer_name=customer_name,
            )
        return await self._fallback(client, config, digits, customer, customer_name)

    async def _fallback(
        self,
        client: CrmLookup,
        config: RetailCrmConfig,
        digits: str,
        customer: Mapping[str, Any] | None,
        customer_name: str,
    ) -> Lookup:
        if customer is None or customer.get("managerId") is None:
            await self._paced(config, "customers")
            found = await client.customers(filters={"name": digits}, limit=20)
            matches = [c for c in found.get("customers") or [] if _has_phone(c, digits)]
            if matches:
                customer = matches[0]
                customer_name = customer_name or person_name(customer)
        if customer is None:
            return Lookup(source="none", customer_name=customer_name)
        manager_id = _as_int(customer.get("managerId"))
        if manager_id is not None:
            return Lookup(source="customer", manager_id=manager_id, customer_name=customer_name)
        customer_id = _as_int(customer.get("id"))
        if customer_id is None:
            return Lookup(source="none", customer_name=customer_name)
        await self._paced(config, "orders")
        orders = (await client.orders(filters={"customerId": customer_id}, limit=100)).get(
            "orders"
        ) or []
        latest = max(
            (o for o in orders if _as_int(o.get("managerId")) is not None),
            key=lambda o: (str(o.get("createdAt") or ""), _as_int(o.get("id")) or 0),
            default=None,
        )
        if latest is None:
            return Lookup(source="none", customer_name=customer_name)
        return Lookup(
            source="order", manager_id=_as_int(latest.get("managerId")), customer_name=customer_name
        )


def _has_phone(customer: Mapping[str, Any], digits: str) -> bool:
    for phone in customer.get("phones") or []:
        number = phone_key(phone.get("number") if isinstance(phone, Mapping) else phone)
        if number and (number.endswith(digits[-9:]) or digits.endswith(number[-9:])):
            return True
    return False


__all__ = [
    "ConfigSource",
    "CrmLookup",
    "Decision",
    "EnterpriseTokens",
    "InternalPhones",
    "Lookup",
    "SmartOptions",
    "SmartRedirect",
    "UserStatusBook",
    "dialplan_context",
    "dialplan_reply",
    "person_name",
    "phone_key",
    "sanitize_name",
    "smart_redirect_component",
]


# --------------------------------------------------------------------------- lifespan component


def _shared_pacer(runtime: Any) -> Pacer:
    """The delivery workers' pacer when they run (one budget per API key), else our own."""
    for component in getattr(runtime, "components", {}).values():
        for holder in (component, getattr(component, "delivery", None)):
            pacer = getattr(holder, "pacer", None)
            if isinstance(pacer, Pacer):
                return pacer
    return Pacer()


@asynccontextmanager
async def smart_redirect_component(runtime: Any) -> AsyncIterator[SmartRedirect]:
    """``COMPONENTS`` entry: the smart-redirect service on the app's pool, HTTP client and configs.

    Exposes ``.tokens`` (dialplan Token -> enterprise) and ``.statuses`` (users' statuses).
    """
    smart = SmartRedirect(
        configs=runtime.configs,
        client_for=runtime.retailcrm,
        internal_phones=InternalPhones(pool=runtime.pool),
        statuses=UserStatusBook(pool=runtime.pool),
        pacer=_shared_pacer(runtime),
    )
    smart.tokens = EnterpriseTokens(pool=runtime.pool)
    async with smart:
        runtime.metrics.add_source("smart_redirect", smart.stats)
        try:
            yield smart
        finally:
            runtime.metrics.remove_source("smart_redirect")
