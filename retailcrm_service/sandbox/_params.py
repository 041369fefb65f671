"""Request parameters the way RetailCRM (PHP) reads them: bracket notation, scalars, JSON fields."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from retailcrm_service.sandbox._errors import (
    INPUT_ERRORS,
    ApiError,
    entity_error,
    missing_parameter,
    non_scalar,
)

Params = dict[str, Any]

INVALID_VALUE = "This value is not valid."
INVALID_JSON = "This value is not valid JSON."
_TRUE = {"1"}
_FALSE = {"0"}
_LENIENT_TRUE = {"1", "true", "True", "TRUE"}
_LENIENT_FALSE = {"0", "false", "False", "FALSE", ""}


def _split_key(key: str) -> list[str]:
    """``a[b][]`` -> ``["a", "b", ""]`` (PHP ``parse_str`` rules)."""
    head, bracket, rest = key.partition("[")
    if not bracket or not head:
        return [key]
    parts = [head]
    rest = "[" + rest
    while rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            return [key]
        parts.append(rest[1:end])
        rest = rest[end + 1 :]
    return parts


def parse_params(pairs: Iterable[tuple[str, str]]) -> Params:
    """Build PHP-style nested params: ``a[]`` appends, ``a[k]`` nests, later scalars overwrite."""
    root: Params = {}
    for key, value in pairs:
        parts = _split_key(key)
        node: dict[str, Any] = root
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            name = str(len(node)) if part == "" else part
            if last:
                node[name] = value
                break
            child = node.get(name)
            if not isinstance(child, dict):
                child = {}
                node[name] = child
            node = child
    return root


def scalar(params: Params, name: str, *, required: bool = True) -> str | None:
    """A scalar parameter; nested keys -> non-scalar error, absence (or empty) -> missing error."""
    value = params.get(name)
    if value is None or (required and value == ""):
        if required:
            raise missing_parameter(name)
        return None
    if isinstance(value, dict):
        raise non_scalar(name)
    return str(value)


def json_field(params: Params, name: str) -> Any:
    """An entity parameter: one form field holding a JSON document."""
    raw = scalar(params, name)
    assert raw is not None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser
        raise entity_error({name: INVALID_JSON}) from exc


def as_list(value: Any) -> list[Any]:
    """``a[]=1&a[]=2`` (a dict with index keys) or a lone scalar -> a list of values."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def parse_bool(name: str, value: str | None, *, strict: bool, default: bool = False) -> bool:
    """RetailCRM numeric booleans (``1``/``0``); ``true``/``True`` only when not strict."""
    if value is None:
        return default
    true, false = (_TRUE, _FALSE) if strict else (_LENIENT_TRUE, _LENIENT_FALSE)
    if value in true:
        return True
    if value in false:
        return False
    raise ApiError(400, INPUT_ERRORS, {name: INVALID_VALUE})


def filter_params(params: Params) -> dict[str, Any]:
    """The ``filter`` parameter; a scalar ``filter`` (e.g. ``filter=None``) is a bad input."""
    value = params.get("filter")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, INPUT_ERRORS, {"filter": "This value should be of type array."})
    return value
