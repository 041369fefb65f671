"""In-memory state of the emulated RetailCRM: accounts, keys, users, customers, orders and logs."""

from __future__ import annotations

import copy
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from retailcrm_service.sandbox._config import SCOPES
from retailcrm_service.sandbox._errors import ControlError

USER_STATUSES = ("free", "busy", "dinner", "break")
_MANAGER_GROUP = {"id": 1, "name": "Менеджеры", "code": "manager"}


def mask(secret: str | None) -> str | None:
    """``***`` plus at most the last 4 characters (none for short secrets)."""
    if secret is None:
        return None
    return "***" + (secret[-4:] if len(secret) >= 12 else "")


_URL_TOKEN = re.compile(r"([?&](?:token|apiKey)=)([^&#]*)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with ``token=`` / ``apiKey=`` query values masked (an ``accountUrl`` carries the
    integration's admin login token)."""
    return _URL_TOKEN.sub(lambda m: m.group(1) + (mask(m.group(2)) or ""), url)


def redact_module(data: Any) -> Any:
    """A module object for display: its ``clientId`` and its ``accountUrl`` token masked."""
    if not isinstance(data, dict):
        return data
    shown = copy.deepcopy(data)
    if isinstance(shown.get("clientId"), str):
        shown["clientId"] = mask(shown["clientId"])
    if isinstance(shown.get("accountUrl"), str):
        shown["accountUrl"] = mask_url(shown["accountUrl"])
    return shown


def digits(phone: str) -> str:
    return "".join(ch for ch in phone if ch.isdigit())


def phones_match(a: str, b: str) -> bool:
    """Same number: equal digits, or the same last 10 digits (``+7 900`` vs ``8 900``)."""
    da, db = digits(a), digits(b)
    if not da or not db:
        return False
    return da == db or (len(da) >= 10 and len(db) >= 10 and da[-10:] == db[-10:])


@dataclass
class ApiKey:
    key: str
    scopes: frozenset[str]
    sites: tuple[str, ...] | None = None
    """Store codes the key may use; None: every store of the account."""

    def __repr__(self) -> str:
        return f"ApiKey(key={mask(self.key)!r}, scopes={sorted(self.scopes)!r})"

    def view(self) -> dict[str, Any]:
        sites = None if self.sites is None else list(self.sites)
        return {"key": mask(self.key), "scopes": sorted(self.scopes), "sites": sites}


@dataclass
class Module:
    code: str
    data: dict[str, Any]
    owner_key: str = field(repr=False)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def telephony(self) -> dict[str, Any] | None:
        integrations = self.data.get("integrations") or {}
        tel = integrations.get("telephony")
        return tel if isinstance(tel, dict) else None

    @property
    def telephony_active(self) -> bool:
        return (
            bool(self.data.get("active")) and not self.data.get("freeze") and bool(self.telephony)
        )

    def code_of_user(self, user_id: int) -> str | None:
        for item in (self.telephony or {}).get("additionalCodes") or []:
            if item.get("userId") == user_id:
                return str(item.get("code"))
        return None

    def users_of_code(self, code: str) -> list[int]:
        return [
            int(item["userId"])
            for item in (self.telephony or {}).get("additionalCodes") or []
            if str(item.get("code")) == code and item.get("userId") is not None
        ]

    def external_phone(self, site: str | None) -> str | None:
        phones = (self.telephony or {}).get("externalPhones") or []
        for item in phones:
            if site is None or item.get("siteCode") == site:
                return str(item.get("externalPhone"))
        return None

    def view(self) -> dict[str, Any]:
        history = [{**h, "module": redact_module(h["module"])} for h in self.history]
        return {
            "code": self.code,
            "owner": mask(self.owner_key),
            "module": redact_module(self.data),
            "history": history,
        }


@dataclass
class Account:
    name: str
    keys: dict[str, ApiKey] = field(default_factory=dict, repr=False)
    sites: list[str] = field(default_factory=list)
    exists: bool = True
    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    customers: dict[int, dict[str, Any]] = field(default_factory=dict)
    orders: dict[int, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, Module] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    popups: list[dict[str, Any]] = field(default_factory=list)
    open_by_user: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    call_index: dict[str, dict[str, Any]] = field(default_factory=dict)
    status_changes: list[dict[str, Any]] = field(default_factory=list)

    def telephony_module(self, key: str) -> Module | None:
        """The active telephony module registered with this key."""
        for module in self.modules.values():
            if module.owner_key == key and module.telephony_active:
                return module
        return None

    def code_of_user(self, user_id: int, key: str | None = None) -> str | None:
        modules = sorted(self.modules.values(), key=lambda m: m.owner_key != key)
        for module in modules:
            if module.telephony_active and (code := module.code_of_user(user_id)) is not None:
                return code
        return None

    def open_popups(self) -> dict[str, list[dict[str, Any]]]:
        return {str(user): list(items) for user, items in self.open_by_user.items() if items}

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exists": self.exists,
            "keys": [k.view() for k in self.keys.values()],
            "sites": list(self.sites),
            "users": list(self.users.values()),
            "customers": list(self.customers.values()),
            "orders": list(self.orders.values()),
            "modules": {code: m.view() for code, m in self.modules.items()},
            "events": self.events,
            "popups": self.popups,
            "openPopups": self.open_popups(),
            "calls": self.calls,
            "statusChanges": self.status_changes,
        }


def _require_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ControlError(422, "invalid_seed", f"{what} must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ControlError(422, "invalid_seed", f"{what} must be an integer") from exc


def make_user(spec: dict[str, Any], created_at: str) -> dict[str, Any]:
    user_id = _require_int(spec.get("id"), "user id")
    status = spec.get("status", "free")
    if status not in USER_STATUSES:
        raise ControlError(422, "invalid_seed", f"user status must be one of {USER_STATUSES}")
    groups = [
        g if isinstance(g, dict) else {"id": 0, "name": str(g), "code": str(g)}
        for g in spec.get("groups", [_MANAGER_GROUP])
    ]
    user = {
        "id": user_id,
        "createdAt": created_at,
        "active": True,
        "email": f"user{user_id}@sandbox.example",
        "firstName": f"User{user_id}",
        "lastName": "",
        "patronymic": "",
        "position": "Менеджер",
        "photoUrl": None,
        "phone": "",
        "status": status,
        "online": True,
        "isAdmin": False,
        "isManager": True,
        "isPosManager": False,
        "groups": groups,
        "mgUserId": None,
        "senderEmail": "",
        "senderName": "",
    }
    user.update({k: v for k, v in spec.items() if k in user and k not in {"id", "groups"}})
    return user


def _phones(value: Any) -> list[dict[str, str]]:
    return [p if isinstance(p, dict) else {"number": str(p)} for p in value or []]


def make_customer(spec: dict[str, Any], created_at: str) -> dict[str, Any]:
    customer_id = _require_int(spec.get("id"), "customer id")
    customer = {
        "type": "customer",
        "id": customer_id,
        "externalId": f"c-{customer_id}",
        "createdAt": created_at,
        "firstName": "",
        "lastName": "",
        "patronymic": "",
        "email": "",
        "phones": [],
        "managerId": None,
        "site": None,
    }
    customer.update({k: v for k, v in spec.items() if k != "id"})
    customer["phones"] = _phones(spec.get("phones"))
    if customer["managerId"] is not None:
        customer["managerId"] = _require_int(customer["managerId"], "managerId")
    return customer


def make_order(spec: dict[str, Any], created_at: str) -> dict[str, Any]:
    order_id = _require_int(spec.get("id"), "order id")
    order = {
        "id": order_id,
        "number": f"{order_id}A",
        "externalId": None,
        "createdAt": created_at,
        "status": "new",
        "site": None,
        "phone": "",
        "managerId": None,
        "customerId": None,
    }
    order.update({k: v for k, v in spec.items() if k != "id"})
    for name in ("managerId", "customerId"):
        if order[name] is not None:
            order[name] = _require_int(order[name], name)
    return order


DEMO_USERS: list[dict[str, Any]] = [
    {"id": 1, "firstName": "Анна", "lastName": "Иванова", "email": "anna@demo.example"},
    {
        "id": 2,
        "firstName": "Борис",
        "lastName": "Петров",
        "email": "boris@demo.example",
        "status": "busy",
    },
    {
        "id": 3,
        "firstName": "Виктор",
        "lastName": "Смирнов",
        "email": "victor@demo.example",
        "status": "dinner",
    },
    {
        "id": 4,
        "firstName": "Галина",
        "lastName": "Орлова",
        "email": "galina@demo.example",
        "online": False,
    },
    {
        "id": 5,
        "firstName": "Дмитрий",
        "lastName": "Админов",
        "email": "admin@demo.example",
        "isAdmin": True,
        "isManager": False,
        "groups": [{"id": 2, "name": "Администраторы", "code": "admins"}],
    },
]
DEMO_CUSTOMERS: list[dict[str, Any]] = [
    {
        "id": 101,
        "firstName": "Иван",
        "lastName": "Сидоров",
        "phones": ["+375291234567"],
        "managerId": 1,
        "email": "ivan@customer.example",
    },
    {
        "id": 102,
        "firstName": "Ольга",
        "lastName": "Кузнецова",
        "phones": ["375447034448"],
        "managerId": 2,
    },
    {"id": 103, "firstName": "Пётр", "lastName": "Волков", "phones": ["+375293193330"]},
    {
        "id": 104,
        "firstName": "Мария",
        "lastName": "Попова",
        "phones": ["+79001234567"],
        "managerId": 4,
    },
]
DEMO_ORDERS: list[dict[str, Any]] = [
    {"id": 1001, "customerId": 103, "managerId": 3, "phone": "+375293193330"},
    {"id": 1002, "customerId": 101, "managerId": 1, "phone": "+375291234567"},
    {"id": 1003, "customerId": 102, "managerId": 2, "phone": "375447034448"},
]


class SandboxState:
    """Everything the emulator remembers; every access holds ``lock`` (servers run in threads)."""

    def __init__(self, *, request_log_size: int, default_sites: tuple[str, ...]) -> None:
        self.lock = threading.RLock()
        self.default_sites = default_sites
        self.accounts: dict[str, Account] = {}
        self.by_key: dict[str, tuple[Account, ApiKey]] = {}
        self.request_log: deque[dict[str, Any]] = deque(maxlen=request_log_size)
        self.rejections: deque[dict[str, Any]] = deque(maxlen=request_log_size)
        self.rejection_count = 0
        self.callbacks: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.account_missing = False
        self.request_seq = 0

    def clear(self) -> None:
        with self.lock:
            self.accounts.clear()
            self.by_key.clear()
            self.request_log.clear()
            self.rejections.clear()
            self.rejection_count = 0
            self.callbacks.clear()
            self.faults.clear()
            self.account_missing = False

    def lookup(self, key: str) -> tuple[Account, ApiKey] | None:
        return self.by_key.get(key)

    def account(self, name: str | None) -> Account:
        """An account by name; without a name, the only account there is."""
        if name is None:
            if len(self.accounts) != 1:
                raise ControlError(422, "account_required", "name the account (several exist)")
            return next(iter(self.accounts.values()))
        try:
            return self.accounts[name]
        except KeyError:
            raise ControlError(404, "unknown_account", f"no account named {name!r}") from None

    def seed_account(self, spec: dict[str, Any], created_at: str) -> Account:
        """Create or extend an account from a seed document (see the package docstring)."""
        if not isinstance(spec, dict):
            raise ControlError(422, "invalid_seed", "an account must be an object")
        name = str(spec.get("name") or f"account-{len(self.accounts) + 1}")
        account = self.accounts.get(name) or Account(name=name, sites=list(self.default_sites))
        keys = list(spec.get("api_keys") or [])
        if spec.get("api_key"):
            keys.append(
                {
                    "key": spec["api_key"],
                    "scopes": spec.get("scopes"),
                    "sites": spec.get("key_sites"),
                }
            )
        for item in keys:
            item = item if isinstance(item, dict) else {"key": item}
            key = str(item.get("key") or "")
            if not key:
                raise ControlError(422, "invalid_seed", "an API key must be a non-empty string")
            owner = self.by_key.get(key)
            if owner is not None and owner[0] is not account:
                raise ControlError(409, "key_in_use", "this API key belongs to another account")
            scopes, sites = item.get("scopes"), item.get("sites")
            api_key = ApiKey(
                key=key,
                scopes=frozenset(SCOPES if scopes is None else scopes),
                sites=None if sites is None else tuple(str(s) for s in sites),
            )
            account.keys[key] = api_key
            self.by_key[key] = (account, api_key)
        if "sites" in spec:
            account.sites = [str(s) for s in spec["sites"]]
        if "exists" in spec:
            account.exists = bool(spec["exists"])
        users = (DEMO_USERS if spec.get("demo") else []) + list(spec.get("users") or [])
        customers = (DEMO_CUSTOMERS if spec.get("demo") else []) + list(spec.get("customers") or [])
        orders = (DEMO_ORDERS if spec.get("demo") else []) + list(spec.get("orders") or [])
        for item in users:
            user = make_user(dict(item), created_at)
            account.users[user["id"]] = user
        for item in customers:
            customer = make_customer(dict(item), created_at)
            account.customers[customer["id"]] = customer
        for item in orders:
            order = make_order(dict(item), created_at)
            account.orders[order["id"]] = order
        self.accounts[name] = account
        return account

    def log_request(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.request_seq += 1
            entry["seq"] = self.request_seq
            self.request_log.append(entry)

    def view(
        self, *, account: str | None = None, requests: int | None = None, since: int = 0
    ) -> dict[str, Any]:
        """Everything, or one account; the request log limited to ``seq > since``, last N."""
        with self.lock:
            accounts = [self.account(account)] if account else list(self.accounts.values())
            log = [entry for entry in self.request_log if entry["seq"] > since]
            if requests is not None:
                log = log[-requests:] if requests > 0 else []
            return copy.deepcopy(
                {
                    "accounts": {a.name: a.view() for a in accounts},
                    "accountMissing": self.account_missing,
                    "requests": log,
                    "rateLimitRejections": {
                        "count": self.rejection_count,
                        "recent": list(self.rejections),
                    },
                    "callbacks": self.callbacks,
                    "faults": self.faults,
                }
            )
