"""Smart redirect over HTTP: ``POST /api/smart-redirect`` and the dialplan's
``POST /api/callevent/getcustomerdata`` (README.md's routes, docs/asterisk.md#dialplan-reply).

The dialplan macro reads the body of ``getcustomerdata`` with ``CURL()``, which ignores the HTTP
status and cuts the text on commas and quotes. So every answer of that route, errors included,
starts with ``{"Name":"","DialPlan":null`` and a macro can never ``Goto`` somewhere it should not.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from retailcrm_service.api.http import read_json, validate
from retailcrm_service.errors import ApiError
from retailcrm_service.runtime import Runtime, RuntimeDep
from retailcrm_service.security.admin_auth import caller_address, is_internal, require_internal
from retailcrm_service.telephony.asterisk_ssh import (
    InvalidArgument,
    validate_channel,
)
from retailcrm_service.telephony.smart_redirect import Decision, dialplan_reply

logger = logging.getLogger(__name__)

router = APIRouter()
INTEGRATION = "retailcrm"
MAX_BODY = 16 * 1024
_ID_RE = re.compile(r"[0-9A-Za-z._-]{1,64}")


class SmartRedirectIn(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    enterprise_number: str = Field(min_length=1, max_length=32, pattern=r"^[0-9A-Za-z_-]+$")
    phone: str = Field(min_length=1, max_length=32)
    call_unique_id: str | None = Field(default=None, max_length=64, pattern=r"^[0-9A-Za-z._-]+$")
    channel: str | None = Field(default=None, max_length=100)
    trunk: str | None = Field(default=None, max_length=40, pattern=r"^[0-9A-Za-z_-]+$")

    @field_validator("channel")
    @classmethod
    def _channel(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        try:
            return validate_channel(value)
        except InvalidArgument:
            raise ValueError("not a valid Asterisk channel name") from None


@router.post("/api/smart-redirect", dependencies=[Depends(require_internal)])
async def smart_redirect(request: Request, runtime: RuntimeDep) -> Any:
    body = validate(SmartRedirectIn, await read_json(request, max_bytes=MAX_BODY))
    decision = await runtime.need_smart_redirect().decide(
        body.enterprise_number, body.phone, trunk=body.trunk
    )
    redirect = "skipped"
    control = runtime.call_control
    if control is not None and control.schedule_redirect(
        decision, body.channel, body.call_unique_id
    ):
        redirect = "scheduled"
    _journal(runtime, decision, body.phone, body.call_unique_id, redirect=redirect)
    return {
        "extension": decision.extension,
        "manager_id": decision.manager_id,
        "source": decision.source,
        "redirect": redirect,
        "manager_name": decision.manager_name,
        "name": decision.name,
        "dialplan": decision.dialplan,
    }


def _journal(
    runtime: Runtime,
    decision: Decision,
    phone: str,
    call_unique_id: str | None,
    *,
    redirect: str | None = None,
) -> None:
    if decision.enterprise_number is None or decision.source == "unknown_enterprise":
        return
    if decision.cached and redirect != "scheduled":
        # A repeat answer from the cache adds nothing to the journal, and writing it costs the
        # real-time path (measured by benchmarks/smart_redirect.py): the lookup was journaled.
        return
    response: dict[str, Any] = {
        "source": decision.source,
        "extension": decision.extension,
        "manager_id": decision.manager_id,
        "dialplan": decision.dialplan,
        "cached": decision.cached,
    }
    if redirect is not None:
        response["redirect"] = redirect
    runtime.logs.write(
        decision.enterprise_number,
        "smart_redirect",
        request_data={"phone": phone},
        response_data=response,
        status="error" if decision.source in {"timeout", "error"} else "success",
        error_message=decision.source if decision.source in {"timeout", "error"} else None,
        call_unique_id=call_unique_id,
    )


# --------------------------------------------------------------------------- the dialplan route


def _dialplan_error(status: int, code: str, message: str) -> Response:
    # Name and DialPlan come first so that the macro's cutting finds "no redirect".
    body = {"Name": "", "DialPlan": None, "error": {"code": code, "message": message}}
    return Response(
        json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
    )


def _first_str(body: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


@router.post("/api/callevent/getcustomerdata")
async def getcustomerdata(request: Request, runtime: RuntimeDep) -> Response:
    try:
        raw = await read_json(request, max_bytes=MAX_BODY)
    except ApiError as exc:
        return _dialplan_error(exc.status, exc.code, exc.message)
    if not isinstance(raw, dict):
        return _dialplan_error(422, "validation_error", "the body must be a JSON object")
    token = request.headers.get("token") or _first_str(raw, "Token")
    phone = _first_str(raw, "Phone")
    trunk = _first_str(raw, "TrunkId", "Trunk", "INCALL", "Incall")
    unique_id = _first_str(raw, "UniqueId")
    if unique_id is not None and not _ID_RE.fullmatch(unique_id):
        unique_id = None
    if not token:
        return _dialplan_error(401, "unauthorized", "the Token header is required")
    smart = runtime.smart_redirect
    if smart is None or smart.tokens is None:
        return _dialplan_error(503, "unavailable", "smart redirect is not running")
    try:
        number = await smart.tokens.resolve(token)
    except Exception as exc:  # fail open: the call must go on without us
        logger.warning("smart_redirect.token_lookup_failed error=%s", type(exc).__name__)
        return Response(dialplan_reply("", None), media_type="application/json")
    if number is None or not await _token_acceptable(request, runtime, token, number):
        return _dialplan_error(401, "unauthorized", "unknown Token")
    if phone is None:
        return _dialplan_error(422, "validation_error", "Phone is required")
    if not smart.admit(number):
        # Fail open at once: the call goes on without a redirect, and no lookup is started.
        return _dialplan_error(429, "rate_limited", "too many requests for this Token")
    decision = await smart.decide(number, phone, trunk=trunk)
    _journal(runtime, decision, phone, unique_id)
    return Response(decision.as_reply(), media_type="application/json")


async def _token_acceptable(request: Request, runtime: Runtime, token: str, number: str) -> bool:
    """An enterprise's number is public and guessable ("0367"): as a Token it proves nothing by
    itself. Internal callers and the enterprise's own Asterisk host (``enterprises.ip``, where
    some dialplans still send the number) may use it; anyone else must present name2 or secret."""
    if token.strip() != number:
        return True
    if is_internal(request, runtime.settings):
        return True
    config = await runtime.configs.get(number)
    caller = caller_address(request)
    return bool(config is not None and config.ip and caller and config.ip.strip() == caller)
