"""Callbacks RetailCRM sends us: click-to-call and users' status changes.

See docs/retailcrm.md#callbacks-from-retailcrm.

``GET|POST /retailcrm/make-call`` and ``GET|POST /retailcrm/status`` take their parameters from the
query string or a form body. The module's ``clientId`` (a long random secret per enterprise,
compared in constant time) identifies the enterprise: unknown -> 401 and nothing else happens;
a source with too many unknown ones is refused for a while (429, ``security/auth_failures.py``).
Each enterprise gets a token bucket (429 with ``Retry-After`` beyond it). Make-call answers at once;
the originate runs over SSH in the background, owned by the Asterisk component, and its outcome
goes to ``integration_logs``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request

from retailcrm_service.api.config import check_number
from retailcrm_service.api.http import read_form
from retailcrm_service.errors import ApiError
from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security.admin_auth import caller_address, require_internal
from retailcrm_service.telephony.asterisk_ssh import (
    InvalidArgument,
    validate_extension,
    validate_host,
    validate_phone,
)
from retailcrm_service.telephony.smart_redirect import USER_STATUSES

logger = logging.getLogger(__name__)

router = APIRouter()
MAX_BODY = 16 * 1024
_MAX_VALUE = 200


# --------------------------------------------------------------------------- rate limit


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class CallbackLimiter:
    """A token bucket per enterprise (keyed by a digest of its clientId)."""

    def __init__(
        self,
        *,
        rate: float = 5.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[bytes, _Bucket] = {}
        self.rejected = 0

    def take(self, client_id: str) -> float:
        """0.0 when admitted, else the seconds until the next token."""
        key = hashlib.sha256(client_id.encode()).digest()
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        self.rejected += 1
        return (1.0 - bucket.tokens) / self.rate


def _limiter(request: Request) -> CallbackLimiter:
    limiter = getattr(request.app.state, "callback_limiter", None)
    if not isinstance(limiter, CallbackLimiter):
        limiter = request.app.state.callback_limiter = CallbackLimiter()
    return limiter


# --------------------------------------------------------------------------- parameters


async def _params(request: Request) -> dict[str, str]:
    """Query parameters, overlaid with a urlencoded or multipart form body on POST."""
    params = {k: v for k, v in request.query_params.items()}
    if request.method == "POST":
        params.update(await read_form(request, max_bytes=MAX_BODY))
    return {k: v.strip() for k, v in params.items() if len(v) <= _MAX_VALUE}


async def _enterprise(runtime: Runtime, request: Request, params: dict[str, str]) -> Any:
    config = await client_config(runtime, request, params.get("clientId"), "callback")
    if not (config.active and config.enabled):
        raise ApiError(403, "disabled", "the RetailCRM integration is off for this account")
    wait = _limiter(request).take(params["clientId"])
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            "too many callbacks for this account",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return config


async def client_config(
    runtime: Runtime, request: Request, client_id: str | None, what: str
) -> Any:
    """The config whose module ``clientId`` this is; 401 when unknown (counted against the
    caller's address), 429 instead while that address has failed too often.

    A known clientId is served whatever its address's failures: RetailCRM's callbacks must not
    stop because someone else sends junk from the same address (a proxy in front of nginx)."""
    config = await runtime.configs.find_by_client_id(client_id) if client_id else None
    if config is not None:
        return config
    source = caller_address(request)
    wait = runtime.auth_failures.retry_after(source)
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            "too many unknown clientIds from this address",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    runtime.auth_failures.failed(source, what)
    raise ApiError(401, "unauthorized", "unknown clientId")


# --------------------------------------------------------------------------- make-call


def _extension_for(config: Any, params: dict[str, str]) -> str:
    user_id = params.get("userId", "")
    local = config.user_extensions.get(user_id) if user_id else None
    candidate = local or params.get("code") or ""
    if not candidate:
        raise ApiError(
            422,
            "validation_error",
            "no extension for this user",
            fields={"code": "missing, and userId maps to no extension"},
        )
    try:
        return validate_extension(candidate)
    except InvalidArgument:
        raise ApiError(
            422, "validation_error", "invalid extension", fields={"code": "2-5 digits"}
        ) from None


@router.api_route("/retailcrm/make-call", methods=["GET", "POST"])
async def make_call(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    params = await _params(request)
    config = await _enterprise(runtime, request, params)
    extension = _extension_for(config, params)
    try:
        phone = validate_phone(params.get("phone", ""))
    except InvalidArgument:
        raise ApiError(
            422, "validation_error", "invalid phone", fields={"phone": "digits, optional +"}
        ) from None
    try:
        host = validate_host(config.ip or "")
    except InvalidArgument:
        raise ApiError(409, "no_host", "the enterprise has no Asterisk host configured") from None
    control = runtime.need_call_control()
    if not control.start_call(config.enterprise_number, host, extension, phone):
        raise ApiError(503, "busy", "too many calls being started; try again")
    return {"success": True, "extension": extension}


# --------------------------------------------------------------------------- status


def _ascii_digits(value: str) -> bool:
    # str.isdigit() alone admits "²" and non-ASCII digits such as "١٢".
    return value.isascii() and value.isdigit()


@router.api_route("/retailcrm/status", methods=["GET", "POST"])
async def user_status(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    params = await _params(request)
    config = await _enterprise(runtime, request, params)
    user_id = params.get("userId", "")
    status = params.get("status", "")
    fields = {}
    if not _ascii_digits(user_id) or len(user_id) > 12:
        fields["userId"] = "a RetailCRM user id"
    if status not in USER_STATUSES:
        fields["status"] = "one of " + ", ".join(sorted(USER_STATUSES))
    code = params.get("code") or None
    if code is not None and not _ascii_digits(code):
        code = None
    if fields:
        raise ApiError(422, "validation_error", "invalid status callback", fields=fields)
    await runtime.user_statuses().record(config.enterprise_number, user_id, status, code=code)
    runtime.logs.write(
        config.enterprise_number,
        "user_status",
        request_data={"userId": user_id, "code": code, "status": status},
        response_data=None,
        status="success",
    )
    return {"success": True}


@router.get("/api/user-status/{enterprise_number}", dependencies=[Depends(require_internal)])
async def list_user_status(enterprise_number: str, runtime: RuntimeDep) -> dict[str, Any]:
    """Internal: the last status RetailCRM reported for each user of the enterprise."""
    check_number(enterprise_number)  # str.isalnum() admits non-ASCII digits and letters
    return {
        "enterprise_number": enterprise_number,
        "statuses": await runtime.user_statuses().all_for(enterprise_number),
    }
