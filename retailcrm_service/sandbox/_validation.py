"""Validation of the entities a telephony integration sends (docs/retailcrm.md#sandbox).

Field errors use Symfony's default messages, keyed by field path like RetailCRM's ``errors`` map.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

BLANK = "This value should not be blank."
CHOICE = "The value you selected is not a valid choice."
NOT_BOOL = "This value should be of type bool."
NOT_INT = "This value should be of type int."
NOT_STRING = "This value should be of type string."
NOT_ARRAY = "This value should be of type array."
NOT_OBJECT = "This value should be of type object."
NOT_URL = "This value is not a valid URL."
NOT_DATETIME = "This value is not a valid datetime."
NOT_SVG = "Logo image must be svg"
CODE_MISMATCH = "The module code must match the code in the URL."

EVENT_TYPES = ("in", "out", "hangup")
HANGUP_STATUSES = ("answered", "busy", "cancel", "failed", "no answered")
CALL_TYPES = ("in", "out")
CALL_RESULTS = ("answered", "busy", "failed", "no answer", "not allowed", "unknown")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")

_MODULE_STRINGS = ("integrationCode", "name", "clientId")
_MODULE_URLS = ("logo", "baseUrl", "accountUrl")
_TELEPHONY_BOOLS = (
    "allowEdit",
    "inputEventSupported",
    "outputEventSupported",
    "hangupEventSupported",
)
_TELEPHONY_URLS = ("makeCallUrl", "changeUserStatusUrl")

Errors = dict[str, str]
T = TypeVar("T")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _is_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def as_int(value: Any) -> int | None:
    """An int, or a string of digits (``"7"``); anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _string(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _check_url(obj: dict[str, Any], name: str, path: str, errors: Errors) -> None:
    if not _blank(obj.get(name)) and not _is_url(obj[name]):
        errors[path] = NOT_URL


def _list(value: Any, path: str, errors: Errors) -> list[Any]:
    """The items of a list field; anything else is an error and has none."""
    if isinstance(value, list):
        return value
    errors[path] = NOT_ARRAY
    return []


def _objects(value: Any, path: str, errors: Errors) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path of the item, item) for each object in a list field; other items are errors."""
    for index, item in enumerate(_list(value, path, errors)):
        if isinstance(item, dict):
            yield f"{path}[{index}]", item
        else:
            errors[f"{path}[{index}]"] = NOT_OBJECT


def _scalars(
    value: Any, path: str, errors: Errors, convert: Callable[[Any], T | None], error: str
) -> list[T]:
    """A list of strings or ints (absent: empty); an item ``convert`` refuses is an error."""
    result = []
    for index, item in enumerate([] if value is None else _list(value, path, errors)):
        converted = convert(item)
        if converted is None:
            errors[f"{path}[{index}]"] = error
        else:
            result.append(converted)
    return result


def _additional_codes(value: Any, errors: Errors) -> list[dict[str, Any]]:
    result = []
    for at, item in _objects(value, "integrations[telephony][additionalCodes]", errors):
        user_id = as_int(item.get("userId"))
        code = _string(item.get("code"))
        if user_id is None:
            errors[f"{at}[userId]"] = NOT_INT
        if code is None or not code.strip():
            errors[f"{at}[code]"] = BLANK
        if user_id is not None and code:
            result.append({"userId": user_id, "code": code})
    return result


def _external_phones(value: Any, errors: Errors) -> list[dict[str, str]]:
    result = []
    for at, item in _objects(value, "integrations[telephony][externalPhones]", errors):
        site, phone = _string(item.get("siteCode")), _string(item.get("externalPhone"))
        for name, val in (("siteCode", site), ("externalPhone", phone)):
            if _blank(val):
                errors[f"{at}[{name}]"] = BLANK
        if site and phone:
            result.append({"siteCode": site, "externalPhone": phone})
    return result


def _telephony(raw: Any, errors: Errors) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        errors["integrations[telephony]"] = NOT_OBJECT
        return None
    tel: dict[str, Any] = {}
    for name in _TELEPHONY_URLS:
        if name in raw:
            _check_url(raw, name, f"integrations[telephony][{name}]", errors)
            tel[name] = raw[name]
    for name in _TELEPHONY_BOOLS:
        if name in raw:
            if not isinstance(raw[name], bool):
                errors[f"integrations[telephony][{name}]"] = NOT_BOOL
            tel[name] = raw[name]
    if "additionalCodes" in raw:
        tel["additionalCodes"] = _additional_codes(raw["additionalCodes"], errors)
    if "externalPhones" in raw:
        tel["externalPhones"] = _external_phones(raw["externalPhones"], errors)
    return tel


def validate_module(raw: Any, path_code: str) -> tuple[dict[str, Any], Errors]:
    """Clean an ``integrationModule``; only documented keys are kept (others ignored silently)."""
    if not isinstance(raw, dict):
        return {}, {"integrationModule": NOT_OBJECT}
    errors: Errors = {}
    module: dict[str, Any] = {}
    code = _string(raw.get("code"))
    if _blank(code):
        errors["code"] = BLANK
    elif code != path_code:
        errors["code"] = CODE_MISMATCH
    module["code"] = code
    for name in _MODULE_STRINGS:
        if name in raw:
            if raw[name] is not None and not isinstance(raw[name], str):
                errors[name] = NOT_STRING
            module[name] = raw[name]
    for name in ("name", "logo", "baseUrl"):
        if _blank(raw.get(name)):
            errors[name] = BLANK
    for name in _MODULE_URLS:
        if name in raw:
            _check_url(raw, name, name, errors)
            module[name] = raw[name]
    logo = raw.get("logo")
    if "logo" not in errors and not urlsplit(str(logo)).path.lower().endswith(".svg"):
        errors["logo"] = NOT_SVG
    if "active" in raw:
        if not isinstance(raw["active"], bool):
            errors["active"] = NOT_BOOL
        module["active"] = raw["active"]
    if "actions" in raw:
        actions = raw["actions"]
        if not isinstance(actions, dict) or not all(isinstance(v, str) for v in actions.values()):
            errors["actions"] = NOT_OBJECT
        module["actions"] = actions
    if "availableCountries" in raw:
        countries = raw["availableCountries"]
        if not isinstance(countries, list) or not all(isinstance(c, str) for c in countries):
            errors["availableCountries"] = NOT_ARRAY
        module["availableCountries"] = countries
    integrations = raw.get("integrations")
    if integrations is not None and not isinstance(integrations, dict):
        errors["integrations"] = NOT_OBJECT
    elif integrations:
        telephony = _telephony(integrations.get("telephony"), errors)
        if telephony is not None:
            module["integrations"] = {"telephony": telephony}
    return module, errors


def validate_event(raw: Any) -> tuple[dict[str, Any], Errors]:
    """Clean a ``telephony/call/event`` ``event`` object."""
    if not isinstance(raw, dict):
        return {}, {"event": NOT_OBJECT}
    errors: Errors = {}
    event: dict[str, Any] = {}
    phone = _string(raw.get("phone"))
    if _blank(phone):
        errors["phone"] = BLANK
    event["phone"] = phone
    if _blank(raw.get("type")):
        errors["type"] = BLANK
    elif raw["type"] not in EVENT_TYPES:
        errors["type"] = CHOICE
    event["type"] = raw.get("type")
    event["codes"] = _scalars(raw.get("codes"), "codes", errors, _string, NOT_STRING)
    event["userIds"] = _scalars(raw.get("userIds"), "userIds", errors, as_int, NOT_INT)
    if raw.get("hangupStatus") is not None:
        if raw["hangupStatus"] not in HANGUP_STATUSES:
            errors["hangupStatus"] = CHOICE
        event["hangupStatus"] = raw["hangupStatus"]
    for name in ("site", "externalPhone", "callExternalId"):
        if raw.get(name) is not None:
            value = _string(raw[name])
            if value is None:
                errors[name] = NOT_STRING
            event[name] = value
    if raw.get("webAnalyticsData") is not None:
        if not isinstance(raw["webAnalyticsData"], dict):
            errors["webAnalyticsData"] = NOT_OBJECT
        event["webAnalyticsData"] = raw["webAnalyticsData"]
    return event, errors


def _valid_datetime(value: Any) -> bool:
    if not isinstance(value, str) or not _DATETIME.match(value):
        return False
    try:
        datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return False
    return True


def _validate_call(raw: Any, path: str, errors: Errors) -> dict[str, Any]:
    if not isinstance(raw, dict):
        errors[path] = NOT_OBJECT
        return {}
    call: dict[str, Any] = {}
    if _blank(raw.get("date")):
        errors[f"{path}[date]"] = BLANK
    elif not _valid_datetime(raw["date"]):
        errors[f"{path}[date]"] = NOT_DATETIME
    if _blank(raw.get("type")):
        errors[f"{path}[type]"] = BLANK
    elif raw["type"] not in CALL_TYPES:
        errors[f"{path}[type]"] = CHOICE
    if _blank(_string(raw.get("phone"))):
        errors[f"{path}[phone]"] = BLANK
    if raw.get("result") is not None and raw["result"] not in CALL_RESULTS:
        errors[f"{path}[result]"] = CHOICE
    for name in ("duration", "durationWaiting", "userId"):
        if raw.get(name) is not None:
            number = as_int(raw[name]) if name == "userId" else raw[name]
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                errors[f"{path}[{name}]"] = NOT_INT
            call[name] = number
    for name in ("code", "externalId", "externalPhone", "site", "clientId", "phone"):
        if raw.get(name) is not None:
            text = _string(raw[name])
            if text is None:
                errors[f"{path}[{name}]"] = NOT_STRING
            call[name] = text
    if raw.get("recordUrl") is not None:
        _check_url(raw, "recordUrl", f"{path}[recordUrl]", errors)
        call["recordUrl"] = raw["recordUrl"]
    if raw.get("source") is not None:
        if not isinstance(raw["source"], dict):
            errors[f"{path}[source]"] = NOT_OBJECT
        call["source"] = raw["source"]
    for name in ("date", "type", "result"):
        if raw.get(name) is not None:
            call[name] = raw[name]
    return call


def validate_calls(raw: Any, max_calls: int) -> tuple[list[dict[str, Any]], Errors]:
    """Clean a ``telephony/calls/upload`` ``calls`` array; one bad call rejects the batch."""
    if not isinstance(raw, list):
        return [], {"calls": NOT_ARRAY}
    if not raw:
        return [], {"calls": "This collection should contain 1 element or more."}
    if len(raw) > max_calls:
        return [], {"calls": f"This collection should contain {max_calls} elements or less."}
    errors: Errors = {}
    calls = [_validate_call(item, f"calls[{i}]", errors) for i, item in enumerate(raw)]
    return calls, errors
