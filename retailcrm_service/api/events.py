"""``POST /api/events`` (durable intake) and ``POST /api/events/replay`` (README.md's routes).

The 202 is sent only after the accepted events are committed; a database failure, or no commit
within ``OutboxConfig.commit_timeout`` (shorter than the call services' attempt timeout), answers
503 ``unavailable`` and nothing of that request is stored, so the caller may simply retry. When
more events already wait for a commit than the intake's bound, the answer is 503 ``overloaded``
at once; both carry Retry-After.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from retailcrm_service.api.http import read_body, read_json
from retailcrm_service.errors import ApiError, error_response
from retailcrm_service.ops.logs import REQUEST_ID, request_id_of
from retailcrm_service.pipeline.intake import (
    MAX_BODY_BYTES,
    BodyInvalid,
    BodyTooLarge,
    EventPipeline,
    Rejected,
    parse_events,
)
from retailcrm_service.pipeline.outbox import OutboxError, OutboxFull
from retailcrm_service.security.admin_auth import require_internal

logger = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_internal)])


def pipeline(request: Request) -> EventPipeline:
    found: EventPipeline | None = getattr(request.app.state, "event_pipeline", None)
    runtime = getattr(request.app.state, "runtime", None)
    if found is None and runtime is not None:
        found = runtime.events
    if found is None:
        raise ApiError(503, "unavailable", "the event pipeline is not running")
    return found


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_events_body(request: Request) -> Any:
    """The JSON body, strictly: NaN/Infinity (not JSON, and PostgreSQL refuses them) and nesting
    too deep to decode are 400s like any other unparseable body; over 1 MiB is a 413."""
    body = await read_body(request, max_bytes=MAX_BODY_BYTES)
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


EVENTS_PATH = "/api/events"


async def serve_events(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /api/events`` at the ASGI level (``scope["app"]`` is the service's app).

    The call services' batches are this service's busiest route: the middleware stack, routing
    and dependency resolution were about 6 % of its CPU at 200 calls/s in
    ``benchmarks/peak_calls.py``. Called before them, this does their part with the same
    functions: the request id, the internal-route check, the route's handler, the error
    envelope, the request metrics. The public side never gets here (``_Sides`` answers 404)."""
    started = time.perf_counter()
    request = Request(scope, receive)
    request_id = request_id_of(scope)
    reset = REQUEST_ID.set(request_id)
    status = 500
    try:
        try:
            await require_internal(request)
            response = await post_events(request)
        except ApiError as exc:
            response = exc.response()
        except ClientDisconnect:  # the caller went away mid-body: nobody to answer
            status = 499
            return
        except Exception:
            logger.exception("events.failed")
            response = error_response(500, "internal", "the events could not be handled")
        response.headers["x-request-id"] = request_id
        status = response.status_code
        await response(scope, receive, send)
    finally:
        REQUEST_ID.reset(reset)
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.observe_request(EVENTS_PATH, "POST", status, time.perf_counter() - started)


@router.post(EVENTS_PATH, status_code=202)
async def post_events(request: Request) -> JSONResponse:
    committed, rejected = _submit(request, await read_events_body(request))
    started = time.perf_counter()
    try:
        fresh = await committed
    except OutboxError as exc:
        raise _not_committed(exc) from None
    metrics = getattr(request.app.state, "metrics", None)  # absent in a bare app (benchmarks)
    if metrics is not None:
        metrics.intake_commit_seconds.observe(time.perf_counter() - started)
    accepted = sum(fresh)
    pipeline(request).count(accepted, len(fresh) - accepted, len(rejected))
    logger.debug(
        "events.committed accepted=%d duplicates=%d rejected=%d",
        accepted,
        len(fresh) - accepted,
        len(rejected),
    )
    return JSONResponse(
        {"accepted": accepted, "duplicates": len(fresh) - accepted, "rejected": rejected},
        status_code=202,
    )


def _submit(request: Request, body: Any) -> tuple[Awaitable[list[bool]], list[dict[str, Any]]]:
    """Validate and queue the events; the awaitable completes with their commit.

    Synchronous on purpose: the decoded body and the parsed events die when this returns, so a
    request waiting for its commit holds no containers for the cyclic GC to keep rescanning.
    """
    try:
        parsed = parse_events(body)
    except BodyTooLarge as exc:
        raise ApiError(413, "too_large", str(exc)) from None
    except BodyInvalid as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    events = [p for p in parsed if not isinstance(p, Rejected)]
    rejected = [{"index": p.index, "error": p.error} for p in parsed if isinstance(p, Rejected)]
    try:
        return pipeline(request).committer.submit(events), rejected
    except OutboxError as exc:
        raise _not_committed(exc) from None


def _not_committed(exc: OutboxError) -> ApiError:
    if isinstance(exc, OutboxFull):  # counted in /stats; one line per request would flood
        return ApiError(
            503,
            "overloaded",
            "too many events wait for storage; retry later",
            headers={"Retry-After": "2"},
        )
    logger.warning("events.not_committed error=%s", exc)
    return ApiError(
        503, "unavailable", "events not stored; retry later", headers={"Retry-After": "1"}
    )


@router.post("/api/events/replay")
async def replay_events(request: Request) -> dict[str, Any]:
    """Re-deliver one event (``id`` or ``idempotency_key``) or an enterprise's failed events.

    Body: ``{"enterprise_number", "id"? | "idempotency_key"? | "since"? (ISO-8601),
    "states"? (default dead, expired, superseded)}``. Answer: ``{"replayed": n, "leased": m}``,
    ``leased`` counting matching rows a worker is sending right now (left alone; replay them
    again once they settle).
    """
    body = await read_json(request, max_bytes=64 * 1024)
    if not isinstance(body, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object")
    fields = _replay_fields(body)
    result = await pipeline(request).replay(**fields)
    return {"replayed": result.replayed, "leased": result.leased}


def _replay_fields(body: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, str] = {}
    number = body.get("enterprise_number")
    if not isinstance(number, str) or not number:
        errors["enterprise_number"] = "required string"
    event_id = body.get("id")
    if event_id is not None and (isinstance(event_id, bool) or not isinstance(event_id, int)):
        errors["id"] = "must be an integer"
    key = body.get("idempotency_key")
    if key is not None and not isinstance(key, str):
        errors["idempotency_key"] = "must be a string"
    since = None
    if body.get("since") is not None:
        try:
            since = datetime.fromisoformat(str(body["since"]))
            if since.tzinfo is None:
                raise ValueError
        except ValueError:
            errors["since"] = "must be an ISO-8601 time with a timezone"
    states = body.get("states", ["dead", "expired", "superseded"])
    allowed = {"dead", "expired", "superseded", "skipped", "delivered"}
    if not isinstance(states, list) or not states or not set(states) <= allowed:
        errors["states"] = f"a non-empty list of {sorted(allowed)}"
    if errors:
        raise ApiError(422, "validation_error", "invalid replay request", fields=errors)
    return {
        "enterprise_number": number,
        "event_id": event_id,
        "idempotency_key": key,
        "since": since,
        "states": states,
    }
