"""Callbacks RetailCRM sends to a registered module, recorded with their replies.

See docs/retailcrm.md#callbacks-from-retailcrm.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from retailcrm_service.sandbox._core import Sandbox
from retailcrm_service.sandbox._errors import ControlError
from retailcrm_service.sandbox._state import USER_STATUSES, Account, Module, mask, mask_url

logger = logging.getLogger(__name__)
_RESPONSE_CAP = 4000


def _telephony_module(account: Account, code: str | None, url_field: str) -> Module:
    if code is not None:
        module = account.modules.get(code)
        if module is None:
            raise ControlError(404, "unknown_module", f"no module {code!r} in {account.name!r}")
        return module
    for module in account.modules.values():
        if module.telephony_active and (module.telephony or {}).get(url_field):
            return module
    raise ControlError(409, "no_telephony_module", f"no active telephony module with {url_field}")


def _module(account: Account, code: Any) -> Module:
    module = account.modules.get(str(code))
    if module is None:
        raise ControlError(404, "unknown_module", f"no module {code!r} in {account.name!r}")
    return module


def _user(account: Account, user_id: Any) -> dict[str, Any]:
    try:
        return account.users[int(user_id)]
    except (KeyError, TypeError, ValueError):
        raise ControlError(
            404, "unknown_user", f"no user {user_id!r} in {account.name!r}"
        ) from None


async def _send(
    sandbox: Sandbox,
    client: httpx.AsyncClient,
    *,
    kind: str,
    account: Account,
    method: str,
    url: str,
    params: dict[str, str],
) -> dict[str, Any]:
    method = method.upper()
    if method not in ("GET", "POST"):
        raise ControlError(422, "invalid_method", "method must be GET or POST")
    record: dict[str, Any] = {
        "kind": kind,
        "at": sandbox.timestamp(),
        "account": account.name,
        "method": method,
        "url": mask_url(url),
        "params": {k: mask(v) if k == "clientId" else v for k, v in params.items()},
        "status": None,
        "response": None,
        "error": None,
    }
    started = sandbox.clock()
    try:
        if method == "GET":
            reply = await client.get(url, params=params)
        else:
            reply = await client.post(url, data=params)
        record["status"] = reply.status_code
        record["response"] = reply.text[:_RESPONSE_CAP]
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        logger.info("sandbox.callback_failed kind=%s error=%s", kind, type(exc).__name__)
    record["durationMs"] = round((sandbox.clock() - started) * 1000, 3)
    with sandbox.state.lock:
        record["id"] = len(sandbox.state.callbacks) + 1
        sandbox.state.callbacks.append(record)
    return record


async def click_to_call(
    sandbox: Sandbox, client: httpx.AsyncClient, spec: dict[str, Any]
) -> dict[str, Any]:
    """A user clicks a number: the module's ``makeCallUrl`` gets clientId, code, phone, userId."""
    with sandbox.state.lock:
        account = sandbox.state.account(spec.get("account"))
        module = _telephony_module(account, spec.get("module"), "makeCallUrl")
        user = _user(account, spec.get("userId"))
        phone = str(spec.get("phone") or "")
        if not phone:
            raise ControlError(422, "invalid_callback", "phone is required")
        telephony = module.telephony or {}
        url = telephony.get("makeCallUrl")
        if not url:
            raise ControlError(409, "no_make_call_url", "the module has no makeCallUrl")
        params = {
            "clientId": str(module.data.get("clientId") or ""),
            "code": module.code_of_user(user["id"]) or "",
            "phone": phone,
            "userId": str(user["id"]),
        }
        external = module.external_phone(spec.get("site"))
        if external is not None:
            params["externalPhone"] = external
    return await _send(
        sandbox,
        client,
        kind="makeCall",
        account=account,
        method=str(spec.get("method") or "GET"),
        url=url,
        params=params,
    )


async def user_status(
    sandbox: Sandbox, client: httpx.AsyncClient, spec: dict[str, Any]
) -> dict[str, Any] | None:
    """A user changes status in the CRM: the user is updated, ``changeUserStatusUrl`` notified."""
    status = spec.get("status")
    if status not in USER_STATUSES:
        raise ControlError(422, "invalid_status", f"status must be one of {USER_STATUSES}")
    with sandbox.state.lock:
        account = sandbox.state.account(spec.get("account"))
        user = _user(account, spec.get("userId"))
        account.status_changes.append(
            {
                "at": sandbox.timestamp(),
                "userId": user["id"],
                "from": user["status"],
                "to": status,
                "by": "ui",
            }
        )
        user["status"] = status
        try:
            module = _telephony_module(account, spec.get("module"), "changeUserStatusUrl")
        except ControlError:
            return None
        url = (module.telephony or {}).get("changeUserStatusUrl")
        if not url:
            return None
        params = {
            "clientId": str(module.data.get("clientId") or ""),
            "userId": str(user["id"]),
            "code": module.code_of_user(user["id"]) or "",
            "status": str(status),
        }
    return await _send(
        sandbox,
        client,
        kind="changeUserStatus",
        account=account,
        method=str(spec.get("method") or "GET"),
        url=url,
        params=params,
    )


async def account_url(
    sandbox: Sandbox, client: httpx.AsyncClient, spec: dict[str, Any]
) -> dict[str, Any]:
    """A user follows the module's settings link: POST ``clientId`` to ``accountUrl``."""
    with sandbox.state.lock:
        account = sandbox.state.account(spec.get("account"))
        module = _module(account, spec.get("code"))
        url = module.data.get("accountUrl")
        if not url:
            raise ControlError(409, "no_account_url", "the module has no accountUrl")
        params = {"clientId": str(module.data.get("clientId") or "")}
    return await _send(
        sandbox, client, kind="accountUrl", account=account, method="POST", url=url, params=params
    )


async def activity(
    sandbox: Sandbox, client: httpx.AsyncClient, spec: dict[str, Any], system_url: str
) -> dict[str, Any] | None:
    """The module is (de)activated or (un)frozen: POST to ``baseUrl`` + ``actions.activity``."""
    with sandbox.state.lock:
        account = sandbox.state.account(spec.get("account"))
        module = _module(account, spec.get("code"))
        active = bool(spec.get("active", module.data.get("active", False)))
        freeze = bool(spec.get("freeze", module.data.get("freeze", False)))
        module.data["active"], module.data["freeze"] = active, freeze
        path = (module.data.get("actions") or {}).get("activity")
        if not path:
            return None
        url = str(module.data.get("baseUrl", "")).rstrip("/") + "/" + path.lstrip("/")
        params = {
            "clientId": str(module.data.get("clientId") or ""),
            "activity": json.dumps({"active": active, "freeze": freeze}),
            "systemUrl": system_url,
        }
    return await _send(
        sandbox, client, kind="activity", account=account, method="POST", url=url, params=params
    )
