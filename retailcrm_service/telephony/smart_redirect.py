"""Smart redirect: which manager should an incoming call ring first, decided within a deadline.

The responsible manager comes from RetailCRM's ``telephony/manager`` (asked with the enterprise's
own account), falling back to the customer's manager and then to the manager of the customer's
latest order. The enterprise's local ``user_extensions`` mapping wins over RetailCRM's
``manager.code``; the extension maps to ``user_internal_phones.id``, which names the dialplan
context ``mngr<id>_<trunk>_1`` (docs/asterisk.md#dialplan-reply).

Real-time rules: every decision is bounded by a hard deadline (default 300 ms) and fails open
(no redirect) past it. CRM lookups are single-flight per (enterprise, phone), run as tasks owned by
``SmartRedirect`` (an ``async with`` object), and are cancelled at the deadline of the decision
that started them (a background refresh gets the enterprise's deadline): a lookup nobody waits for
any more must not hold a slot of the key's budget that delivery needs. Answers are cached per
enterprise: found managers for minutes, "nobody" for less, errors not at all. Lookups are paced
with the shared ``Pacer`` (``telephony/manager`` counts against the 40 req/s telephony budget) on
its interactive lane, ahead of queued delivery within the lane's share. ``admit`` rate-limits the
dialplan's requests per enterprise (each dialplan ``Token`` names one), so a flood of distinct
callers cannot turn into a flood of lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from retailcrm_service.crm.pacing import Pacer
from retailcrm_service.telephony.asterisk_ssh import InvalidArgument, validate_context
from vochi_crm_client import (
    NOT_LOADED,
    CacheSettings,
    RefreshingCache,
    enterprise_for_token,
    mask_token,
)

if TYPE_CHECKING:
    from retailcrm_service.storage.enterprise_configs import RetailCrmConfig

logger = logging.getLogger(__name__)

USER_STATUSES = frozenset({"free", "busy", "dinner", "break"})
# Found managers stay fresh for minutes (then are served stale while one background lookup
# refreshes them); "unknown caller" answers for less; errors are not stored.
DEFAULT_CACHE = CacheSettings(
    ttl=300.0,
    ttl_jitter=0.1,
    negative_ttl=30.0,
    max_staleness=3600.0,
    retry_interval=5.0,
    load_timeout=10.0,
    sweep_interval=1.0,
    # One entry per (enterprise, caller): bounded, callers' numbers are unbounded.
    max_entries=50_000,
    max_negative=20_000,
)
MAX_NAME_CHARS = 48
_TRUNK_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
# The event-loop time at which the decision that is looking up gives up. The cache starts its
# load task from the deciding task, and a task copies the context it was created in, so the load
# sees its own caller's deadline here (unset for loads nobody waits for).
_DECISION_DEADLINE: ContextVar[float | None] = ContextVar("smart_redirect_deadline", default=None)


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
    return "".join(ch for ch in str(phone) if "0" <= ch <= "9")


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
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
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


class _Cached:
    """An ``async with`` owner of one RefreshingCache (the helpers below share this)."""

    _cache: RefreshingCache[Any, Any]

    async def __aenter__(self) -> Any:
        await self._cache.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._cache.__aexit__(*exc_info)

    def stats(self) -> dict[str, Any]:
        return self._cache.stats()

    async def _cached(self, key: Any) -> Any:
        value = self._cache.peek(key)
        return await self._cache.get(key) if value is NOT_LOADED else value


class UserStatusBook(_Cached):
    """Users' statuses reported by RetailCRM (``/retailcrm/status``), in ``retailcrm_user_status``.

    Reads are cached for ``ttl`` seconds; this instance's own writes are visible at once.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._pool = pool
        settings = CacheSettings(ttl=ttl, ttl_jitter=0, negative_ttl=ttl, max_staleness=ttl * 30)
        self._cache = RefreshingCache(
            load_one=self._load, settings=settings, name="user_status", clock=clock, sleep=sleep
        )

    async def _load(self, key: tuple[str, str]) -> str | None:
        status = await self._pool.fetchval(
            """SELECT status FROM retailcrm_user_status
               WHERE enterprise_number = $1 AND retailcrm_user_id = $2""",
            *key,
        )
        return str(status) if status is not None else None

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
        self._cache.invalidate((enterprise_number, user_id), reload=False)

    async def get(self, enterprise_number: str, user_id: str) -> str | None:
        """The last reported status, or None when RetailCRM never told us."""
        value = await self._cached((enterprise_number, user_id))
        return str(value) if value is not None else None

    async def all_for(self, enterprise_number: str) -> dict[str, str]:
        rows = await self._pool.fetch(
            """SELECT retailcrm_user_id, status FROM retailcrm_user_status
               WHERE enterprise_number = $1""",
            enterprise_number,
        )
        return {r["retailcrm_user_id"]: r["status"] for r in rows}


class InternalPhones(_Cached):
    """``user_internal_phones``: extension -> id per enterprise, cached for ``ttl`` seconds."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._pool = pool
        settings = CacheSettings(ttl=ttl, max_staleness=ttl * 30)
        self._cache = RefreshingCache(
            load_one=self._load,
            settings=settings,
            name="internal_phones",
            clock=clock,
            sleep=sleep,
        )

    async def _load(self, enterprise_number: str) -> dict[str, int]:
        rows = await self._pool.fetch(
            """SELECT phone_number, min(id) AS id FROM user_internal_phones
               WHERE enterprise_number = $1 GROUP BY phone_number""",
            enterprise_number,
        )
        return {r["phone_number"]: int(r["id"]) for r in rows}

    async def id_of(self, enterprise_number: str, extension: str) -> int | None:
        table = await self._cached(enterprise_number)
        value = table.get(extension) if isinstance(table, dict) else None
        return int(value) if value is not None else None


class EnterpriseTokens(_Cached):
    """The dialplan's ``Token`` header -> ``enterprises.number`` (name2, secret or number).

    Unknown tokens are cached negatively, so junk tokens cannot hammer the database; the
    negative entries are bounded, and a flood of them costs O(1) per token.
    ``forget(number)`` is the change hook: an enterprise's tokens changed (or it was added).
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        ttl: float = 300.0,
        negative_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._pool = pool
        settings = CacheSettings(ttl=ttl, negative_ttl=negative_ttl, max_staleness=ttl * 12)
        self._cache = RefreshingCache(
            load_one=self._load,
            settings=settings,
            name="dialplan_tokens",
            describe_key=mask_token,
            clock=clock,
            sleep=sleep,
        )

    async def _load(self, token: str) -> str | None:
        return await enterprise_for_token(self._pool, token)

    def forget(self, enterprise_number: str) -> None:
        """Drop every negative token (one may name the enterprise now) and the enterprise's."""
        self._cache.invalidate_negatives()
        self._cache.invalidate_if(lambda _token, owner: owner == enterprise_number)

    async def resolve(self, token: str) -> str | None:
        token = token.strip()
        if not token or len(token) > 128:
            return None
        value = await self._cached(token)
        return str(value) if value is not None else None


class RateLimit:
    """Requests per second per name (GCRA): ``rate`` on average, up to ``burst`` at once.

    Names are enterprises whose dialplan token resolved, so the table is bounded by the number of
    enterprises.
    """

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tat: dict[str, float] = {}

    def allow(self, name: str) -> bool:
        now = self._clock()
        interval = 1.0 / self.rate
        tat = max(self._tat.get(name, now), now)
        if tat - now > (self.burst - 1) * interval + 1e-9:
            return False
        self._tat[name] = tat + interval
        return True


# --------------------------------------------------------------------------- the service


ClientFactory = Callable[["RetailCrmConfig"], CrmLookup]
_Key = tuple[str, str, str]  # (enterprise number, credentials fingerprint, caller digits)


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
        tokens: EnterpriseTokens | None = None,
        pacer: Pacer | None = None,
        cache: CacheSettings | None = None,
        default_deadline: float = 0.3,
        token_rate: float = 20.0,
        token_burst: int = 40,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._configs = configs
        self.limit = RateLimit(rate=token_rate, burst=token_burst, clock=clock)
        self._client_for = client_for
        self._phone_id = (
            internal_phones.id_of
            if isinstance(internal_phones, InternalPhones)
            else internal_phones
        )
        self._statuses = statuses
        self._pacer = pacer
        self._default_deadline = default_deadline
        # The library's cache: single-flight loads owned by the cache (they outlive a caller's
        # deadline and land for the next call), stale-while-revalidate, negative entries.
        self._cache: RefreshingCache[_Key, Lookup] = RefreshingCache(
            load_one=self._load,
            settings=cache or DEFAULT_CACHE,
            name="smart_redirect",
            describe_key=lambda key: f"{key[0]}/***{key[2][-4:]}",
            clock=clock,
            sleep=sleep,
            rng=rng,
        )
        self.statuses = statuses
        self.tokens = tokens
        self._owned: list[Any] = [
            h for h in (statuses, internal_phones, tokens) if isinstance(h, _Cached)
        ]
        self._stack: contextlib.AsyncExitStack | None = None
        self.counters: dict[str, int] = {
            "decisions": 0,
            "timeouts": 0,
            "errors": 0,
            "lookups_cancelled": 0,
            "rate_limited": 0,
        }

    async def __aenter__(self) -> SmartRedirect:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._cache)
            for helper in self._owned:
                await stack.enter_async_context(helper)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(None, None, None)

    def forget(self, enterprise_number: str) -> int:
        """Drop cached answers of one enterprise (its config changed); returns how many."""
        return self._cache.invalidate_if(lambda key, _value: key[0] == enterprise_number)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "cache": self._cache.stats()}

    def admit(self, enterprise_number: str) -> bool:
        """Whether one more dialplan request of this enterprise fits its rate; counts refusals."""
        if self.limit.allow(enterprise_number):
            return True
        self.counters["rate_limited"] += 1
        return False

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
                token = _DECISION_DEADLINE.set(started + options.deadline)
                try:
                    return await self._decide(config, options, digits, trunk, outcome)
                finally:
                    _DECISION_DEADLINE.reset(token)
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
        peeked = self._cache.peek(key)
        cached = peeked is not NOT_LOADED
        value = peeked if cached else await self._cache.get(key)
        found = value if isinstance(value, Lookup) else Lookup(source="none")
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

    async def _load(self, key: _Key) -> Lookup | None:
        """The cache's loader: ask RetailCRM with the enterprise's own account.

        None (cached for the shorter negative TTL) when RetailCRM knows neither a manager nor
        a name for the caller; errors propagate (the cache does not store them).
        """
        config = await self._configs.get(key[0])
        if config is None or not config.is_on:
            return None
        loop = asyncio.get_running_loop()
        deadline = _DECISION_DEADLINE.get()
        if deadline is None:  # nobody waits (a background refresh): the enterprise's own deadline
            deadline = loop.time() + SmartOptions.from_mapping(config.smart_redirect).deadline
        try:
            async with asyncio.timeout_at(deadline):
                found = await self._ask_crm(config, key[2])
        except TimeoutError:
            # Past the deadline the answer is worth nothing to the caller; the pacer waiter or
            # the request is cancelled with it, and the next call asks afresh.
            self.counters["lookups_cancelled"] += 1
            logger.info("smart_redirect.lookup_cancelled enterprise=%s", config.enterprise_number)
            raise
        except Exception as exc:
            logger.warning(
                "smart_redirect.lookup_failed enterprise=%s error=%s",
                config.enterprise_number,
                type(exc).__name__,
            )
            raise
        if found.manager_id is None and not found.customer_name:
            return None
        return found

    async def _paced(self, config: RetailCrmConfig, method: str) -> None:
        if self._pacer is not None and config.api_key is not None:
            # The interactive lane: a lookup goes before the key's queued delivery requests.
            await self._pacer.acquire(config.api_key.get_secret_value(), method, interactive=True)

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
    "RateLimit",
    "SmartOptions",
    "SmartRedirect",
    "UserStatusBook",
    "dialplan_context",
    "dialplan_reply",
    "person_name",
    "phone_key",
    "sanitize_name",
]


# --------------------------------------------------------------------------- lifespan component
