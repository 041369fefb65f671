"""Body parsing and error rendering shared by every route module of ``retailcrm_service.api``.

Every error on our routes is ``{"error": {"code": "...", "message": "...", "fields"?: {...}}}``:

- ``raise ApiError(status, code, message, fields=None)`` from any route or dependency;
- ``await read_json(request, max_bytes=...)``: the parsed JSON body; 400 ``invalid_json`` when
  unparseable, 413 ``too_large`` when over the limit; ``read_form`` likewise for form bodies
  (400 ``invalid_form``), ``read_body`` for the raw bytes;
- ``validate(model, data, context=None)``: a pydantic model, or 422 ``validation_error`` with
  ``fields`` = ``{"<dotted.path>": "<message>"}``.

``install_error_handlers(app)`` (called by ``create_app``) renders these, FastAPI's own validation
errors and plain ``HTTPException`` in the same envelope.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from retailcrm_service.errors import ApiError, error_response

M = TypeVar("M", bound=BaseModel)

DEFAULT_MAX_BODY = 1024 * 1024


def _field_errors(exc: ValidationError | RequestValidationError) -> dict[str, str]:
    fields: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        key = ".".join(loc) or "body"
        message = str(err.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        fields.setdefault(key, message)
    return fields


async def read_body(request: Request, *, max_bytes: int = DEFAULT_MAX_BODY) -> bytes:
    """The raw body, read no further than ``max_bytes`` (413 ``too_large`` beyond it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "too_large", f"body larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "too_large", f"body larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(
    request: Request, *, max_bytes: int = DEFAULT_MAX_BODY, max_fields: int = 50
) -> dict[str, str]:
    """The text fields of a urlencoded or multipart body (files ignored); {} for other bodies.

    The body is read under ``max_bytes`` first (413), so a chunked upload without a
    Content-Length cannot make the form parser buffer without bound; unparseable: 400.
    """
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return {}
    body = await read_body(request, max_bytes=max_bytes)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=0, max_fields=max_fields)
    except Exception:  # python-multipart and starlette raise several unrelated types
        raise ApiError(400, "invalid_form", "the form body cannot be parsed") from None
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def read_json(request: Request, *, max_bytes: int = DEFAULT_MAX_BODY) -> Any:
    """The request's JSON body (see module docstring for the errors)."""
    body = await read_body(request, max_bytes=max_bytes)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:  # e.g. "[[[[...": nesting deeper than the parser's stack
        raise ApiError(400, "invalid_json", "the body is nested too deeply") from None


def validate(model: type[M], data: Any, *, context: dict[str, Any] | None = None) -> M:
    """``model`` built from ``data``, or ApiError 422 with per-field messages."""
    if not isinstance(data, dict):
        raise ApiError(
            422,
            "validation_error",
            "the body must be a JSON object",
            fields={"body": "expected an object"},
        )
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ApiError(
            422, "validation_error", "invalid fields in the body", fields=_field_errors(exc)
        ) from None


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "validation_error", "invalid request", _field_errors(exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
        return error_response(
            exc.status_code,
            code.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=dict(exc.headers) if exc.headers else None,
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
