"""The RetailCRM API v5 methods the sandbox answers (docs/retailcrm.md#sandbox)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from retailcrm_service.sandbox._config import SandboxConfig
from retailcrm_service.sandbox._errors import (
    INPUT_ERRORS,
    NOT_FOUND,
    TELEPHONY_DISABLED,
    UPLOAD_DISABLED,
    ApiError,
    entity_error,
)
from retailcrm_service.sandbox._params import (
    Params,
    as_list,
    filter_params,
    json_field,
    parse_bool,
    scalar,
)
from retailcrm_service.sandbox._state import (
    USER_STATUSES,
    Account,
    ApiKey,
    Module,
    digits,
    mask,
    phones_match,
)
from retailcrm_service.sandbox._validation import (
    CHOICE,
    validate_calls,
    validate_event,
    validate_module,
)

Reply = tuple[int, dict[str, Any]]
LIMITS = (20, 50, 100)


@dataclass
class Context:
    """One authenticated API request."""

    config: SandboxConfig
    account: Account
    key: ApiKey
    params: Params = field(repr=False)  # may carry ``apiKey``
    path_args: dict[str, str]
    base_url: str
    now: str
    received_ts: float
    """When the request arrived: wall-clock epoch seconds (the sandbox's ``now`` clock)."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    pattern: re.Pattern[str]
    scope: str | None
    handler: Callable[[Context], Reply]

    @property
    def bucket(self) -> str:
        return "telephony" if self.name.startswith("telephony/") else "general"


# --- service methods -----------------------------------------------------------------------


def api_versions(ctx: Context) -> Reply:
    return 200, {"success": True, "versions": ["3.0", "4.0", "5.0"]}


def credentials(ctx: Context) -> Reply:
    methods = [f"/api/v5/{e.name}" for e in ENDPOINTS if e.scope in ctx.key.scopes]
    return 200, {
        "success": True,
        "scopes": sorted(ctx.key.scopes),
        "credentials": methods,
        "siteAccess": "access_selective" if ctx.key.sites is not None else "access_full",
        "sitesAvailable": list(ctx.account.sites if ctx.key.sites is None else ctx.key.sites),
    }


def system_info(ctx: Context) -> Reply:
    return 200, {
        "success": True,
        "language": "ru",
        "systemVersion": "8.0.0-sandbox",
        "publicUrl": ctx.base_url,
        "technicalUrl": ctx.base_url,
    }


# --- integration modules --------------------------------------------------------------------


def module_get(ctx: Context) -> Reply:
    module = ctx.account.modules.get(ctx.path_args["code"])
    if module is None:
        raise ApiError(404, NOT_FOUND)
    return 200, {"success": True, "integrationModule": copy.deepcopy(module.data)}


def _module_info(account: Account, data: dict[str, Any]) -> dict[str, Any] | list[Any]:
    telephony = (data.get("integrations") or {}).get("telephony") or {}
    users = [c["userId"] for c in telephony.get("additionalCodes", [])]
    sites = [p["siteCode"] for p in telephony.get("externalPhones", [])]
    missing_users = sorted({u for u in users if u not in account.users})
    missing_sites = sorted({s for s in sites if s not in account.sites})
    if not missing_users and not missing_sites:
        return []  # RetailCRM's PHP serialisation of an empty info: a JSON array
    return {"notExistUsersIds": missing_users, "notExistSiteCodes": missing_sites}


def module_edit(ctx: Context) -> Reply:
    code = ctx.path_args["code"]
    cleaned, errors = validate_module(json_field(ctx.params, "integrationModule"), code)
    if errors:
        raise entity_error(errors)
    account = ctx.account
    existing = account.modules.get(code)
    if existing is not None and not ctx.config.module_edit_replaces:
        cleaned = {**existing.data, **cleaned}
    cleaned.setdefault("active", existing.data.get("active", False) if existing else False)
    cleaned.setdefault("integrationCode", code)
    cleaned["freeze"] = existing.data.get("freeze", False) if existing else False
    cleaned["native"] = False
    module = existing or Module(code=code, data={}, owner_key=ctx.key.key)
    module.data = cleaned
    module.owner_key = ctx.key.key
    module.history.append(
        {
            "at": ctx.now,
            "key": mask(ctx.key.key),
            "created": existing is None,
            "module": copy.deepcopy(cleaned),
        }
    )
    account.modules[code] = module
    return (200 if existing else 201), {"success": True, "info": _module_info(account, cleaned)}


# --- telephony ------------------------------------------------------------------------------


def _popup_matches(popup: dict[str, Any], event: dict[str, Any]) -> bool:
    call_id = event.get("callExternalId")
    if call_id and popup.get("callExternalId"):
        return bool(popup["callExternalId"] == call_id)
    return phones_match(popup["phone"], event["phone"])


def _close(ctx: Context, popup: dict[str, Any], state: str, status: str | None = None) -> None:
    popup.update(state=state, closedAt=ctx.now, hangupStatus=status)
    ctx.account.open_by_user[popup["userId"]].remove(popup)


def _apply_popups(ctx: Context, event: dict[str, Any], users: list[int]) -> list[int]:
    """Open a card per targeted user on in/out (replacing one of the same call); hangup closes."""
    account = ctx.account
    if event["type"] == "hangup":
        closed = []
        for user_id in users or list(account.open_by_user):
            for popup in list(account.open_by_user.get(user_id, ())):
                if _popup_matches(popup, event):
                    _close(ctx, popup, "closed", event.get("hangupStatus"))
                    closed.append(user_id)
        return closed
    for user_id in users:
        for popup in list(account.open_by_user.get(user_id, ())):
            if _popup_matches(popup, event):
                _close(ctx, popup, "superseded")
        popup = {
            "id": len(account.popups) + 1,
            "userId": user_id,
            "state": "open",
            "type": event["type"],
            "phone": event["phone"],
            "callExternalId": event.get("callExternalId"),
            "site": event.get("site"),
            "externalPhone": event.get("externalPhone"),
            "openedAt": ctx.now,
            "closedAt": None,
            "hangupStatus": None,
        }
        account.popups.append(popup)
        opened = account.open_by_user.setdefault(user_id, [])
        opened.append(popup)
        if len(opened) > ctx.config.max_open_popups_per_user:
            _close(ctx, opened[0], "expired")  # cards never hung up do not pile up forever
    return users


def call_event(ctx: Context) -> Reply:
    raw = json_field(ctx.params, "event")
    module = ctx.account.telephony_module(ctx.key.key)
    if module is None:
        raise ApiError(ctx.config.telephony_disabled_status, TELEPHONY_DISABLED)
    event, errors = validate_event(raw)
    if errors:
        raise entity_error(errors)
    targets: list[int] = []
    not_exist_codes: list[str] = []
    for code in event["codes"]:
        users = [u for u in module.users_of_code(code) if u in ctx.account.users]
        if not users:
            not_exist_codes.append(code)
        targets += users
    not_exist_users = [u for u in event["userIds"] if u not in ctx.account.users]
    targets += [u for u in event["userIds"] if u in ctx.account.users]
    targets = list(dict.fromkeys(targets))
    affected = _apply_popups(ctx, event, targets)
    ctx.account.events.append(
        {
            "at": ctx.now,
            "receivedTs": ctx.received_ts,
            "module": module.code,
            "event": event,
            "extra": {
                k: mask(v) if k == "clientId" and isinstance(v, str) else v
                for k, v in ctx.params.items()
                if k not in ("event", "apiKey")
            },
            "users": affected,
        }
    )
    body: dict[str, Any] = {"success": True}
    if not_exist_codes:
        body["notExistCodes"] = not_exist_codes
    if not_exist_users:
        body["notExistUsers"] = not_exist_users
    return 200, body


def calls_upload(ctx: Context) -> Reply:
    raw = json_field(ctx.params, "calls")
    if ctx.account.telephony_module(ctx.key.key) is None:
        raise ApiError(ctx.config.telephony_disabled_status, UPLOAD_DISABLED)
    calls, errors = validate_calls(raw, ctx.config.max_calls_per_upload)
    if errors:
        raise entity_error(errors)
    duplicates: list[str] = []
    processed = 0
    index = ctx.account.call_index
    for call in calls:
        external_id = call.get("externalId")
        if external_id and external_id in index:
            index[external_id]["duplicates"] += 1
            duplicates.append(external_id)
            continue
        stored = {**call, "receivedAt": ctx.now, "receivedTs": ctx.received_ts, "duplicates": 0}
        ctx.account.calls.append(stored)
        if external_id:
            index[external_id] = stored
        processed += 1
    return 200, {"success": True, "processedCallsCount": processed, "duplicateCalls": duplicates}


def _find_customer(account: Account, phone: str) -> dict[str, Any] | None:
    for customer in account.customers.values():
        if any(phones_match(p.get("number", ""), phone) for p in customer["phones"]):
            return customer
    return None


def _customer_orders(account: Account, customer: dict[str, Any] | None, phone: str) -> list[Any]:
    orders = [
        o
        for o in account.orders.values()
        if (customer and o["customerId"] == customer["id"])
        or (not customer and o.get("phone") and phones_match(o["phone"], phone))
    ]
    return sorted(orders, key=lambda o: (o["createdAt"], o["id"]))


def _manager_view(ctx: Context, user: dict[str, Any]) -> dict[str, Any]:
    view = {k: user[k] for k in ("id", "firstName", "lastName", "patronymic", "email")}
    code = ctx.account.code_of_user(user["id"], ctx.key.key)
    if code is not None:
        view["code"] = code
    return view


def _links(ctx: Context, phone: str, customer: Any, orders: list[Any]) -> dict[str, str]:
    quoted = quote(phone, safe="")
    links = {
        "newOrderLink": f"{ctx.base_url}/orders/add?phone={quoted}",
        "newCustomerLink": f"{ctx.base_url}/customers/add?phone={quoted}",
    }
    if customer is not None:
        links["customerLink"] = f"{ctx.base_url}/customers/{customer['id']}"
    if orders:
        links["lastOrderLink"] = f"{ctx.base_url}/orders/{orders[-1]['id']}/edit"
    return links


def telephony_manager(ctx: Context) -> Reply:
    phone = scalar(ctx.params, "phone")
    assert phone is not None
    strict = ctx.config.strict_booleans
    details = parse_bool("details", scalar(ctx.params, "details", required=False), strict=strict)
    ignore = parse_bool(
        "ignoreStatus", scalar(ctx.params, "ignoreStatus", required=False), strict=strict
    )
    account = ctx.account
    customer = _find_customer(account, phone)
    orders = _customer_orders(account, customer, phone)
    manager_id = customer.get("managerId") if customer else None
    if manager_id is None:
        manager_id = next((o["managerId"] for o in reversed(orders) if o["managerId"]), None)
    manager = account.users.get(manager_id) if manager_id is not None else None
    if manager is not None and not manager["active"]:
        manager = None
    available = ctx.config.manager_available_statuses
    if manager is not None and not ignore and manager["status"] not in available:
        manager = None
    body: dict[str, Any] = {"success": True}
    if manager is not None:
        body["manager"] = _manager_view(ctx, manager)
    elif ctx.config.no_manager_shape == "404":
        raise ApiError(404, NOT_FOUND)
    elif ctx.config.no_manager_shape == "null":
        body["manager"] = None
    if details:
        if customer is not None:
            body["customer"] = {
                k: customer[k]
                for k in ("id", "externalId", "firstName", "lastName", "email", "phones")
            }
        body["links"] = _links(ctx, phone, customer, orders)
    return 200, body


# --- users, customers, orders ---------------------------------------------------------------


def _paginate(ctx: Context, items: list[Any], key: str) -> Reply:
    limit_raw = scalar(ctx.params, "limit", required=False)
    page_raw = scalar(ctx.params, "page", required=False)
    errors = {}
    limit = int(limit_raw) if limit_raw and limit_raw.isdigit() else None
    if limit_raw is None:
        limit = 20
    elif limit not in LIMITS:
        errors["limit"] = CHOICE
    page = int(page_raw) if page_raw and page_raw.isdigit() else None
    if page_raw is None:
        page = 1
    elif not page or page < 1:
        errors["page"] = "This value should be greater than or equal to 1."
    if errors:
        raise ApiError(400, INPUT_ERRORS, errors)
    assert limit is not None
    assert page is not None
    total = len(items)
    return 200, {
        "success": True,
        "pagination": {
            "limit": limit,
            "totalCount": total,
            "currentPage": page,
            "totalPageCount": (total + limit - 1) // limit,
        },
        key: copy.deepcopy(items[(page - 1) * limit : page * limit]),
    }


def _flag(ctx: Context, filters: dict[str, Any], name: str) -> bool | None:
    value = filters.get(name)
    if value is None:
        return None
    if isinstance(value, dict):
        raise ApiError(400, INPUT_ERRORS, {f"filter[{name}]": "This value is not valid."})
    return parse_bool(f"filter[{name}]", str(value), strict=ctx.config.strict_booleans)


def _user_matches(ctx: Context, user: dict[str, Any], filters: dict[str, Any]) -> bool:
    for name in ("online", "active", "isManager", "isPosManager", "isAdmin"):
        flag = _flag(ctx, filters, name)
        if flag is not None and bool(user.get(name)) != flag:
            return False
    email = filters.get("email")
    if email and str(email).lower() != str(user["email"]).lower():
        return False
    status = filters.get("status")
    if status and (user["status"] != status or not user["online"]):
        return False
    groups = [str(g) for g in as_list(filters.get("groups"))]
    if groups and not any(g["code"] in groups for g in user["groups"]):
        return False
    created_from, created_to = filters.get("createdAtFrom"), filters.get("createdAtTo")
    created = str(user["createdAt"])[:10]
    if created_from and created < str(created_from):
        return False
    return not (created_to and created > str(created_to))


def users_list(ctx: Context) -> Reply:
    filters = filter_params(ctx.params)
    status = filters.get("status")
    if status is not None and status not in USER_STATUSES:
        raise ApiError(400, INPUT_ERRORS, {"filter[status]": CHOICE})
    users = sorted(ctx.account.users.values(), key=lambda u: u["id"])
    return _paginate(ctx, [u for u in users if _user_matches(ctx, u, filters)], "users")


def user_get(ctx: Context) -> Reply:
    user = ctx.account.users.get(int(ctx.path_args["id"]))
    if user is None:
        raise ApiError(404, NOT_FOUND)
    return 200, {"success": True, "user": copy.deepcopy(user)}


def user_status(ctx: Context) -> Reply:
    user = ctx.account.users.get(int(ctx.path_args["id"]))
    if user is None:
        raise ApiError(404, NOT_FOUND)
    status = scalar(ctx.params, "status")
    if status not in USER_STATUSES:
        raise ApiError(400, INPUT_ERRORS, {"status": CHOICE})
    ctx.account.status_changes.append(
        {"at": ctx.now, "userId": user["id"], "from": user["status"], "to": status, "by": "api"}
    )
    user["status"] = status
    return 200, {"success": True}


def _ids(filters: dict[str, Any], name: str) -> set[str]:
    return {str(v) for v in as_list(filters.get(name))}


def _customer_matches(ctx: Context, customer: dict[str, Any], filters: dict[str, Any]) -> bool:
    ids, managers = _ids(filters, "ids"), _ids(filters, "managers")
    if ids and str(customer["id"]) not in ids:
        return False
    if managers and str(customer["managerId"]) not in managers:
        return False
    name = str(filters.get("name") or "").strip().lower()
    if not name:
        return True
    names = " ".join(str(customer[k] or "") for k in ("firstName", "lastName", "patronymic"))
    if name in names.lower() or name in str(customer["email"] or "").lower():
        return True
    wanted = digits(name)
    phones = [digits(p.get("number", "")) for p in customer["phones"]]
    return (
        ctx.config.customer_name_matches_phone and bool(wanted) and any(wanted in p for p in phones)
    )


def customers_list(ctx: Context) -> Reply:
    filters = filter_params(ctx.params)
    items = sorted(ctx.account.customers.values(), key=lambda c: c["id"])
    return _paginate(ctx, [c for c in items if _customer_matches(ctx, c, filters)], "customers")


def _order_view(order: dict[str, Any]) -> dict[str, Any]:
    view = dict(order)
    if order["customerId"] is not None:
        view["customer"] = {"type": "customer", "id": order["customerId"]}
    return view


def _order_matches(order: dict[str, Any], filters: dict[str, Any], account: Account) -> bool:
    ids, managers = _ids(filters, "ids"), _ids(filters, "managers")
    if ids and str(order["id"]) not in ids:
        return False
    if managers and str(order["managerId"]) not in managers:
        return False
    customer_id = filters.get("customerId")
    if customer_id is not None and str(order["customerId"]) != str(customer_id):
        return False
    text = str(filters.get("customer") or "").strip().lower()
    if text:
        customer = account.customers.get(order["customerId"] or -1) or {}
        names = " ".join(str(customer.get(k) or "") for k in ("firstName", "lastName", "email"))
        if text not in names.lower() and not (
            digits(text) and digits(text) in digits(order["phone"])
        ):
            return False
    return True


def orders_list(ctx: Context) -> Reply:
    filters = filter_params(ctx.params)
    items = sorted(ctx.account.orders.values(), key=lambda o: o["id"])
    matched = [_order_view(o) for o in items if _order_matches(o, filters, ctx.account)]
    return _paginate(ctx, matched, "orders")


def _endpoint(
    name: str,
    method: str,
    scope: str | None,
    handler: Callable[[Context], Reply],
    *,
    v5: bool = True,
) -> Endpoint:
    regex = (
        re.escape(name).replace(r"\{code\}", r"(?P<code>[^/]+)").replace(r"\{id\}", r"(?P<id>\d+)")
    )
    prefix = "/api/v5/" if v5 else "/api/"
    return Endpoint(name, method, re.compile(re.escape(prefix) + regex), scope, handler)


ENDPOINTS: tuple[Endpoint, ...] = (
    _endpoint("api-versions", "GET", None, api_versions, v5=False),
    _endpoint("credentials", "GET", None, credentials, v5=False),
    _endpoint("system-info", "GET", None, system_info, v5=False),
    _endpoint("integration-modules/{code}", "GET", "integration_read", module_get),
    _endpoint("integration-modules/{code}/edit", "POST", "integration_write", module_edit),
    _endpoint("telephony/call/event", "POST", "telephony_write", call_event),
    _endpoint("telephony/calls/upload", "POST", "telephony_write", calls_upload),
    _endpoint("telephony/manager", "GET", "telephony_read", telephony_manager),
    _endpoint("users", "GET", "user_read", users_list),
    _endpoint("users/{id}", "GET", "user_read", user_get),
    _endpoint("users/{id}/status", "POST", "user_write", user_status),
    _endpoint("customers", "GET", "customer_read", customers_list),
    _endpoint("orders", "GET", "order_read", orders_list),
)


def match(path: str) -> tuple[list[Endpoint], dict[str, str]]:
    """Every endpoint whose path matches (one per verb) and the path's arguments."""
    found, args = [], {}
    for endpoint in ENDPOINTS:
        m = endpoint.pattern.fullmatch(path)
        if m:
            found.append(endpoint)
            args = m.groupdict()
    return found, args
