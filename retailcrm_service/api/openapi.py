"""OpenAPI of the internal API: ``GET /openapi.json`` (also ``/api/openapi.json``), internal only.

The routes read their bodies themselves (size caps, strict JSON, one error envelope), so the
document is not inferred from their signatures: ``ROUTES`` lists every internal route with its
request model, its answer's model and examples, and ``internal_openapi()`` builds the document
from it. Tests keep it honest: every internal route of the app is in ``ROUTES`` (and nothing
else), real answers validate against the models, and ``docs/api.md`` is ``markdown()`` of it
(regenerate with ``python -m retailcrm_service.api.openapi > docs/api.md``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from retailcrm_service import __version__
from retailcrm_service.api.config import TestIn
from retailcrm_service.api.smart_redirect import SmartRedirectIn
from retailcrm_service.security.admin_auth import require_internal
from retailcrm_service.storage.config_writes import ConfigIn

router = APIRouter(tags=["ops"])

# -- the error envelope ---------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_json"])
    message: str = Field(examples=["the body is not valid JSON"])
    fields: dict[str, str] | None = Field(
        default=None, description="per-field messages of a validation error"
    )


class Error(BaseModel):
    """Every error answer of the API."""

    error: ErrorDetail


# -- events ---------------------------------------------------------------------------------------


class EventIn(BaseModel):
    """One call event (README.md's routes; docs/architecture.md#the-flow)."""

    model_config = ConfigDict(extra="allow")

    enterprise_number: str = Field(examples=["0367"])
    event_type: Literal["dial", "bridge", "hangup", "download"]
    call_unique_id: str | None = Field(
        default=None, description="default: payload.UniqueId", examples=["1757840723.6"]
    )
    payload: dict[str, Any] = Field(description="the host's webhook fields, as received")
    occurred_at: str | None = Field(default=None, description="ISO-8601")
    origin: Literal["live", "download"] | None = None
    idempotency_key: str | None = Field(default=None, description="computed when absent")


class EventsIn(BaseModel):
    """A batch (at most 1000 events, 1 MiB); a single event object is accepted too."""

    events: list[EventIn] = Field(max_length=1000)


class RejectedEvent(BaseModel):
    index: int
    error: str


class EventsAccepted(BaseModel):
    """Sent only after the accepted events are committed."""

    accepted: int
    duplicates: int
    rejected: list[RejectedEvent]


class ReplayIn(BaseModel):
    enterprise_number: str
    id: int | None = None
    idempotency_key: str | None = None
    since: str | None = Field(default=None, description="ISO-8601")
    states: list[Literal["dead", "expired", "superseded", "delivered", "skipped"]] | None = Field(
        default=None, description="default: dead, expired, superseded"
    )


class Replayed(BaseModel):
    replayed: int


# -- smart redirect -------------------------------------------------------------------------------


class SmartRedirectOut(BaseModel):
    extension: str | None
    manager_id: int | None
    source: str = Field(description="where the answer came from (cache, crm, timeout, ...)")
    redirect: Literal["scheduled", "skipped"]
    manager_name: str | None = None
    name: str | None = None
    dialplan: str | None = None


class CustomerDataIn(BaseModel):
    """The dialplan macro's body; the ``Token`` header (or field) names the enterprise."""

    model_config = ConfigDict(extra="allow")

    Phone: str
    UniqueId: str | None = None
    TrunkId: str | None = None
    Token: str | None = None


class DialplanAnswer(BaseModel):
    """The compact answer the dialplan macro parses (``Name`` first); errors add ``error``."""

    Name: str
    DialPlan: str | None
    error: ErrorDetail | None = None


# -- config ---------------------------------------------------------------------------------------


class ConfigView(BaseModel):
    """An enterprise's RetailCRM config as shown anywhere: secrets masked."""

    model_config = ConfigDict(extra="allow")

    enterprise_number: str
    configured: bool
    active: bool
    enabled: bool
    domain: str | None
    api_key: str | None = Field(description="masked: *** and the last 4 characters")
    api_key_set: bool
    api_key_error: str | None
    client_id: str | None = Field(description="masked")
    user_extensions: dict[str, Any]
    timezone: str
    account_timezone: str | None
    internal_calls: bool
    external_phones: list[dict[str, Any]]
    smart_redirect: dict[str, Any]
    module: dict[str, Any]
    last_sync: Any
    is_on: bool


class ConfigDeleted(BaseModel):
    enterprise_number: str
    deleted: bool
    module_deactivated: bool | None
    retailcrm_error: dict[str, Any] | None
    admin_tokens_revoked: bool


class ConnectionReport(BaseModel):
    """What the key may do in RetailCRM, or the precise error."""

    model_config = ConfigDict(extra="allow")

    enterprise_number: str
    domain: str
    ok: bool
    error: dict[str, Any] | None = None


class CacheRefreshed(BaseModel):
    enterprise_number: str
    exists: bool
    configured: bool
    is_on: bool


class CacheRefreshedAll(BaseModel):
    enterprises: int
    active: int


class ActiveEnterprises(BaseModel):
    enterprises: list[str]
    count: int


class UserStatuses(BaseModel):
    enterprise_number: str
    statuses: Any = Field(description="the last status RetailCRM reported per user")


# -- operations -----------------------------------------------------------------------------------


class Health(BaseModel):
    """200 while the database answers (``degraded`` lists why), 503 when it does not."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "degraded"]
    reasons: list[str]
    database: dict[str, Any]
    listener: dict[str, Any]
    cache: dict[str, Any]
    outbox: dict[str, Any]


class Stats(BaseModel):
    """Counters per component (``service``, ``config_cache``, ``outbox``, ...)."""

    model_config = ConfigDict(extra="allow")


# -- the route table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    response: type[BaseModel] | None
    status: int = 200
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = (403,)
    example_request: dict[str, Any] | None = None
    example_response: Any = None
    media_type: str = "application/json"
    aliases: tuple[str, ...] = field(default=())


_EVENT_EXAMPLE = {
    "enterprise_number": "0367",
    "event_type": "dial",
    "call_unique_id": "1757840723.6",
    "payload": {"UniqueId": "1757840723.6", "Phone": "+375291234567", "Extensions": ["150"]},
}
_N = "/{enterprise_number}"

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/api/events",
        "Store call events durably (group commit), then answer",
        EventsAccepted,
        202,
        EventsIn,
        (400, 403, 413, 503),
        {"events": [_EVENT_EXAMPLE]},
        {"accepted": 1, "duplicates": 0, "rejected": []},
    ),
    Route(
        "POST",
        "/api/events/replay",
        "Make dead, expired or superseded events due again",
        Replayed,
        request=ReplayIn,
        errors=(403, 422),
        example_request={"enterprise_number": "0367", "states": ["dead"]},
        example_response={"replayed": 3},
    ),
    Route(
        "POST",
        "/api/smart-redirect",
        "The responsible manager's extension for an incoming call, within a deadline",
        SmartRedirectOut,
        request=SmartRedirectIn,
        errors=(403, 422, 503),
        example_request={"enterprise_number": "0367", "phone": "+375291234567"},
        example_response={
            "extension": "150",
            "manager_id": 19,
            "source": "crm",
            "redirect": "skipped",
        },
    ),
    Route(
        "POST",
        "/api/callevent/getcustomerdata",
        "The dialplan macro's lookup (Token header); never blocks the call",
        DialplanAnswer,
        request=CustomerDataIn,
        errors=(401, 422, 503),
        example_request={"Phone": "+375291234567", "UniqueId": "1757840723.6"},
        example_response={"Name": "Ivan", "DialPlan": "150"},
    ),
    Route(
        "GET",
        "/api/config" + _N,
        "An enterprise's config, secrets masked",
        ConfigView,
        errors=(403, 404),
    ),
    Route(
        "PUT",
        "/api/config" + _N,
        "Save an enterprise's config (merged; api_key may be omitted to keep it)",
        ConfigView,
        request=ConfigIn,
        errors=(403, 404, 422),
        example_request={
            "domain": "https://example.retailcrm.ru",
            "api_key": "...",
            "enabled": True,
        },
    ),
    Route(
        "DELETE",
        "/api/config" + _N,
        "Deactivate the module in RetailCRM, revoke admin tokens, remove the config",
        ConfigDeleted,
        errors=(403, 404),
    ),
    Route(
        "POST",
        "/api/config" + _N + "/test",
        "Check the saved (or given) domain and key against RetailCRM",
        ConnectionReport,
        request=TestIn,
        errors=(403, 404, 422),
    ),
    Route(
        "POST",
        "/api/config-cache/refresh" + _N,
        "Reload one enterprise's cached config",
        CacheRefreshed,
        errors=(403, 503),
    ),
    Route(
        "POST",
        "/api/config-cache/refresh-all",
        "Reload the whole config cache",
        CacheRefreshedAll,
        errors=(403, 503),
    ),
    Route(
        "GET",
        "/api/config-cache/active-enterprises",
        "Enterprises with RetailCRM on",
        ActiveEnterprises,
        example_response={"enterprises": ["0367"], "count": 1},
    ),
    Route(
        "GET", "/api/user-status" + _N, "Users' last statuses reported by RetailCRM", UserStatuses
    ),
    Route(
        "GET",
        "/health",
        "Database, listener, cache and outbox state (open to all)",
        Health,
        errors=(503,),
        aliases=("/api/health",),
    ),
    Route("GET", "/stats", "Counters of every component", Stats, aliases=("/api/stats",)),
    Route(
        "GET",
        "/metrics",
        "Prometheus text format (docs/operations.md#metrics)",
        None,
        media_type="text/plain",
        aliases=("/api/metrics",),
    ),
    Route("GET", "/openapi.json", "This document", None, aliases=("/api/openapi.json",)),
)


def _schemas() -> tuple[dict[tuple[type[BaseModel], str], Any], dict[str, Any]]:
    models: set[type[BaseModel]] = {Error}
    for route in ROUTES:
        models.update(m for m in (route.request, route.response) if m is not None)
    mode: dict[bool, Literal["validation", "serialization"]] = {
        True: "validation",
        False: "serialization",
    }
    keys = [(m, mode[m in _request_models()]) for m in sorted(models, key=lambda m: m.__name__)]
    refs, top = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    out: dict[tuple[type[BaseModel], str], Any] = {}
    for (model, kind), ref in refs.items():
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        out[(model, kind)] = ref
    return out, top.get("$defs", {})


def _request_models() -> set[type[BaseModel]]:
    return {r.request for r in ROUTES if r.request is not None}


def _body(schema: Any, media_type: str, example: Any) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": schema}
    if example is not None:
        content["example"] = example
    return {media_type: content}


def internal_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the internal API."""
    refs, schemas = _schemas()
    error_ref = refs[(Error, "serialization")]
    paths: dict[str, Any] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{route.path.strip('/').replace('/', '_')}",
            "responses": {},
        }
        if "{enterprise_number}" in route.path:
            operation["parameters"] = [
                {
                    "name": "enterprise_number",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9A-Za-z_-]{1,32}$"},
                    "example": "0367",
                }
            ]
        if route.request is not None:
            operation["requestBody"] = {
                "required": route.request is not TestIn,
                "content": _body(
                    refs[(route.request, "validation")], "application/json", route.example_request
                ),
            }
        schema = (
            refs[(route.response, "serialization")]
            if route.response is not None
            else {"type": "string"}
            if route.media_type == "text/plain"
            else {"type": "object"}
        )
        operation["responses"][str(route.status)] = {
            "description": "success",
            "content": _body(schema, route.media_type, route.example_response),
        }
        for status in route.errors:
            operation["responses"][str(status)] = {
                "description": _ERROR_TEXT.get(status, "error"),
                "content": {"application/json": {"schema": error_ref}},
            }
        for path in (route.path, *route.aliases):
            paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Vochi RetailCRM service: internal API",
            "version": __version__,
            "description": (
                "Internal callers only: loopback, or X-Internal-Token when "
                "RETAILCRM_INTERNAL_TOKEN is set. Every error is the Error envelope."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "internalToken": {"type": "apiKey", "in": "header", "name": "X-Internal-Token"}
            },
        },
        "security": [{}, {"internalToken": []}],
    }


_ERROR_TEXT = {
    400: "the body is not valid JSON",
    401: "no or unknown Token",
    403: "not an internal caller",
    404: "no such enterprise",
    413: "the body is too large",
    422: "a field is invalid (error.fields names it)",
    503: "a dependency (database, RetailCRM, a part of the service) is unavailable",
}


def markdown() -> str:
    """``docs/api.md``: the document as a readable reference."""
    spec = internal_openapi()
    lines = [
        "# Internal API",
        "",
        "Generated from the service's OpenAPI document (`GET /openapi.json`, internal callers",
        "only) by `python -m retailcrm_service.api.openapi > docs/api.md`; a test checks that",
        'this file matches it. Every error is `{"error": {"code", "message", "fields"?}}`.',
        "",
        "| method | path | answer | summary |",
        "|---|---|---|---|",
    ]
    for route in ROUTES:
        paths = " ".join(f"`{p}`" for p in (route.path, *route.aliases))
        answer = route.response.__name__ if route.response is not None else route.media_type
        lines.append(f"| {route.method} | {paths} | {route.status} {answer} | {route.summary} |")
    lines.append("")
    for route in ROUTES:
        lines += [f"## {route.method} {route.path}", "", route.summary + ".", ""]
        if route.request is not None:
            lines.append(f"Request body: `{route.request.__name__}`.")
        errors = ", ".join(str(s) for s in route.errors)
        lines += [f"Answers: {route.status}; errors: {errors}.", ""]
        for title, example in (
            ("Request", route.example_request),
            ("Answer", route.example_response),
        ):
            if example is not None:
                lines += [f"{title}:", "", "```json", json.dumps(example, indent=2), "```", ""]
    lines += ["## Schemas", ""]
    for name, schema in sorted(spec["components"]["schemas"].items()):
        lines += [f"### {name}", ""]
        if schema.get("description"):
            lines += [schema["description"], ""]
        required = set(schema.get("required", []))
        lines += ["| field | type | required |", "|---|---|---|"]
        for prop, info in schema.get("properties", {}).items():
            lines.append(f"| `{prop}` | {_type(info)} | {'yes' if prop in required else ''} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _type(info: dict[str, Any]) -> str:
    if "$ref" in info:
        return str(info["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in info:
        return " or ".join(_type(i) for i in info["anyOf"])
    if "enum" in info:
        return " or ".join(f"`{json.dumps(v)}`" for v in info["enum"])
    if "const" in info:
        return f"`{json.dumps(info['const'])}`"
    if info.get("type") == "array":
        return f"list of {_type(info.get('items', {}))}"
    return str(info.get("type", "any"))


@router.get("/openapi.json", dependencies=[Depends(require_internal)], include_in_schema=False)
@router.get("/api/openapi.json", dependencies=[Depends(require_internal)], include_in_schema=False)
async def openapi_document(request: Request) -> dict[str, Any]:
    cached: dict[str, Any] | None = getattr(request.app.state, "openapi", None)
    if cached is None:
        cached = request.app.state.openapi = internal_openapi()
    return cached


if __name__ == "__main__":
    sys.stdout.write(markdown())
