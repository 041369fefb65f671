"""``vochi-call-service``: the reference call service (README.md's commands).

It receives the Asterisk hosts' webhooks (``POST /start /dial /bridge /hangup``; recovered hangups
as ``POST /hangup`` with ``origin: "download"``, or ``POST /download``), resolves the ``Token``
(header or body) to the enterprise through the matrix, translates the payload and answers 200 right
after ``emit``: the host's 3 s timeout never depends on a CRM. ``/health``, ``/stats`` and
``/metrics`` come from ``adapters.fastapi``; ``/metrics`` has the library's ``vochi_crm_client_*``
series and the webhooks' ``vochi_call_service_*`` (docs/operations.md).

Replies: 200 ``{"status": "queued"|"skipped", ...}``; 400 unparseable JSON; 401 no Token; 403
unknown Token; 413 body too large; 422 a payload that cannot be a call event; 503 the matrix could
not be read for a Token never seen before; 500 a failure of our own (logged with its traceback).
Errors are ``{"error": {"code", "message"}}``. Any other method on a webhook path gets 405.

Request ids: every webhook gets one (``X-Request-ID`` taken or made, returned, in its log lines),
and each batch POST to a CRM carries the ids of the webhooks whose events it holds
(``X-Request-ID: id1,id2``, up to 16), so one call can be followed into the service's logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from adapters.fastapi import crm_lifespan, crm_of, operations_router
from adapters.translate import Skipped, Translator
from retailcrm_service import __version__
from retailcrm_service.crm.client import AioTransport
from retailcrm_service.ops.logs import (
    FORMATS,
    LEVELS,
    REQUEST_ID,
    RequestIdMiddleware,
    configure,
    new_request_id,
    valid_request_id,
)
from vochi_crm_client import NOT_LOADED, CrmClient, VochiCrmError, mask_token

__all__ = ["CallServiceSettings", "create_app", "main", "parse_targets"]

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: Final = "retailcrm=http://127.0.0.1/retailcrm/api/events"
WEBHOOKS: Final = ("start", "dial", "bridge", "hangup", "download")
_QUEUED: Final = b'{"status":"queued"}'


@dataclass(frozen=True, slots=True, kw_only=True)
class CallServiceSettings:
    """Everything the call service needs; ``client_options`` go to ``CrmClient`` as keywords
    (its configuration objects: ``dispatch=DispatchConfig(...)``, ``breaker=``, ``cache=``...)."""

    dsn: str = field(repr=False)
    targets: Mapping[str, str]
    forward_internal: bool = False
    forward_crm_originated: bool = False
    max_body_bytes: int = 64 * 1024
    client_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("at least one target is required")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")


def parse_targets(items: Iterable[str]) -> dict[str, str]:
    """``["retailcrm=http://...", ...]`` -> ``{"retailcrm": "http://..."}``; raises ValueError."""
    targets: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        name, sep, url = item.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"a target is NAME=URL with an http(s) URL, not {item!r}")
        targets[name] = url
    if not targets:
        raise ValueError("no targets given")
    return targets


_Reply = tuple[int, bytes]  # the status and the JSON body of a webhook's answer


def _json(content: object) -> bytes:
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def _error_body(code: str, message: str) -> bytes:
    return _json({"error": {"code": code, "message": message}})


class _Headers:
    """The few request headers a webhook reads, found in one pass over the ASGI list."""

    __slots__ = ("content_length", "request_id", "token")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self.token: str | None = None
        self.content_length = ""
        self.request_id: str | None = None
        for name, value in raw:  # the server gives names in lower case
            if name == b"token":
                self.token = value.decode("latin-1")
            elif name == b"content-length":
                self.content_length = value.decode("latin-1")
            elif name == b"x-request-id":
                self.request_id = value.decode("latin-1")


_CALL_ID: Final = re.compile(rb'"call_unique_id":"((?:[^"\\]|\\.)*)"')
_MAX_IDS: Final = 16


class _RequestIds:
    """Which webhook requests each recent call's events came from (bounded, oldest forgotten)."""

    def __init__(self, max_calls: int = 10_000) -> None:
        self._by_call: OrderedDict[str, list[str]] = OrderedDict()
        self._max = max_calls

    def note(self, call_unique_id: str) -> None:
        request_id = REQUEST_ID.get()
        if request_id is None:
            return
        ids = self._by_call.pop(call_unique_id, [])
        if request_id not in ids:
            ids = [*ids[-3:], request_id]
        self._by_call[call_unique_id] = ids
        while len(self._by_call) > self._max:
            self._by_call.popitem(last=False)

    def for_batch(self, body: bytes) -> str | None:
        found: list[str] = []
        for raw in dict.fromkeys(_CALL_ID.findall(body)):
            for request_id in self._by_call.get(raw.decode("utf-8", "replace"), ()):
                if request_id not in found:
                    found.append(request_id)
        return valid_request_id(",".join(found[:_MAX_IDS])) if found else None


class _RequestIdTransport(httpx.AsyncBaseTransport):
    """Adds the batch's webhook request ids to every batch POST as ``X-Request-ID``."""

    def __init__(self, inner: httpx.AsyncBaseTransport, ids: _RequestIds) -> None:
        self._inner = inner
        self._ids = ids

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request_id = self._ids.for_batch(request.content)
        if request_id is not None:
            request.headers["X-Request-ID"] = request_id
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _WebhookCollector(Collector):
    """The webhook counters of ``/stats`` as ``vochi_call_service_*_total`` families."""

    def __init__(self, webhooks: _Webhooks) -> None:
        self._webhooks = webhooks

    def collect(self) -> Iterator[Metric]:
        hooks = self._webhooks
        families = (
            ("webhooks", "Host webhooks received, by event", "event", hooks.received),
            ("skipped_webhooks", "Webhooks not forwarded, by reason", "reason", hooks.skipped),
            ("webhook_errors", "Webhooks answered with an error, by code", "code", hooks.errors),
        )
        for name, doc, label, counts in families:
            family = CounterMetricFamily(f"vochi_call_service_{name}", doc, labels=[label])
            for value, count in sorted(counts.items()):
                family.add_metric([value], float(count))
            yield family


class _Webhooks:
    """The webhook handler and its counters (one per app)."""

    def __init__(self, settings: CallServiceSettings) -> None:
        self.settings = settings
        self.translate = Translator(
            forward_internal=settings.forward_internal,
            forward_crm_originated=settings.forward_crm_originated,
        )
        self.received: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.request_ids = _RequestIds()
        self.registry = CollectorRegistry()
        self.registry.register(_WebhookCollector(self))
        self.ack_seconds = Histogram(
            "vochi_call_service_webhook_duration_seconds",
            "Time to answer a host webhook (the host gives up after 3 s), by event",
            ["event"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0),
            registry=self.registry,
        )
        self._ack = {host_event: self.ack_seconds.labels(host_event) for host_event in WEBHOOKS}

    def stats(self) -> dict[str, Any]:
        return {
            "webhooks": {
                "received": dict(self.received),
                "skipped": dict(self.skipped),
                "errors": dict(self.errors),
            }
        }

    def fail(self, status: int, code: str, message: str) -> _Reply:
        self.errors[code] += 1
        return status, _error_body(code, message)

    async def serve(self, scope: Scope, receive: Receive, send: Send, host_event: str) -> None:
        """Answer one host webhook, at the ASGI level: the hot path skips the framework's
        middleware, routing and ``Request`` (13 % of the call service's CPU at 100 calls/s in
        ``benchmarks/peak_calls.py``), so it does their part itself: the request id, the body
        limit, a JSON 500 for a failure."""
        started = time.perf_counter()
        headers = _Headers(scope["headers"])
        request_id = REQUEST_ID.get() or valid_request_id(headers.request_id) or new_request_id()
        reset = REQUEST_ID.set(request_id)
        try:
            try:
                reply = await self.handle(scope, headers, receive, host_event)
            except Exception:
                logger.exception("call_service.webhook_failed event=%s", host_event)
                reply = self.fail(500, "internal", "the webhook could not be handled")
            if reply is None:  # the host went away before its body arrived
                return
            status, body = reply
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            REQUEST_ID.reset(reset)
            self._ack[host_event].observe(time.perf_counter() - started)

    async def handle(
        self, scope: Scope, headers: _Headers, receive: Receive, host_event: str
    ) -> _Reply | None:
        self.received[host_event] += 1
        body = await self._read_body(headers, receive)
        if not isinstance(body, dict):
            return body
        token = headers.token or body.get("Token")
        if not isinstance(token, str) or not token.strip():
            return self.fail(401, "missing_token", "the Token header (or body field) is required")
        crm = crm_of(scope)
        number = await self._resolve(crm, token.strip())
        if not isinstance(number, str):
            return number
        try:
            result = self.translate(
                host_event, body, enterprise_number=number, received_at=datetime.now(UTC)
            )
        except ValueError as exc:
            return self.fail(422, "invalid_event", str(exc))
        if isinstance(result, Skipped):
            self.skipped[result.reason] += 1
            return 200, _json({"status": "skipped", "reason": result.reason})
        self.request_ids.note(result.call_unique_id)
        crm.emit(result)
        logger.debug(
            "call_service.queued event=%s enterprise=%s call=%s",
            result.event_type,
            number,
            result.call_unique_id,
        )
        return 200, _QUEUED

    async def _read_body(
        self, headers: _Headers, receive: Receive
    ) -> dict[str, Any] | _Reply | None:
        limit = self.settings.max_body_bytes
        declared = headers.content_length
        if declared.isdigit() and int(declared) > limit:
            return self.fail(413, "too_large", f"the body is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return self.fail(413, "too_large", f"the body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            body = json.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            return self.fail(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(body, dict):
            return self.fail(400, "invalid_json", "the body must be a JSON object")
        return body

    async def _resolve(self, crm: CrmClient, token: str) -> str | _Reply:
        number = crm.matrix.lookup_token(token)
        if number is NOT_LOADED:
            try:
                number = await crm.resolve_token(token)
            except VochiCrmError:
                logger.warning("call_service.token_unresolved token=%s", mask_token(token))
                return self.fail(503, "matrix_unavailable", "enterprises cannot be read now")
        if number is None:
            return self.fail(403, "unknown_token", "the Token names no known enterprise")
        assert isinstance(number, str)
        return number


class _CallServiceApp(FastAPI):
    """The FastAPI app with the webhooks answered before its middleware stack: a ``POST`` to a
    webhook path goes straight to ``_Webhooks.serve``; everything else takes the usual way."""

    def __init__(self, webhooks: _Webhooks, **options: Any) -> None:
        super().__init__(**options)
        self.hooks = webhooks  # (FastAPI's own ``webhooks`` is its OpenAPI router)
        self._paths = {f"/{host_event}": host_event for host_event in WEBHOOKS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            host_event = self._paths.get(scope["path"])
            if host_event is not None:
                await self.hooks.serve(scope, receive, send, host_event)
                return
        await super().__call__(scope, receive, send)


class _WebhookEndpoint:
    """The webhook's route in the router (an ASGI endpoint): it answers a ``POST`` that did not
    take the fast path (under a root path, say) the same way, and gives other methods their 405."""

    def __init__(self, webhooks: _Webhooks, host_event: str) -> None:
        self.webhooks = webhooks
        self.host_event = host_event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.webhooks.serve(scope, receive, send, self.host_event)


def create_app(settings: CallServiceSettings) -> FastAPI:
    """The call service's ASGI app; its lifespan owns the ``CrmClient``."""
    webhooks = _Webhooks(settings)

    def make_client() -> CrmClient:
        options = dict(settings.client_options)
        n = int(options.get("max_in_flight", 4))
        # aiohttp's pool under httpx's API, as the service uses for RetailCRM: over httpcore the
        # batch POSTs made the call service's CPU about a fifth higher (benchmarks/peak_calls.py).
        inner = options.pop("transport", None) or AioTransport(
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)
        )
        transport = _RequestIdTransport(inner, webhooks.request_ids)
        return CrmClient(dsn=settings.dsn, targets=settings.targets, transport=transport, **options)

    app = _CallServiceApp(
        webhooks,
        title="vochi-call-service",
        lifespan=crm_lifespan(make_client, registry=webhooks.registry),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    for host_event in WEBHOOKS:
        endpoint = _WebhookEndpoint(webhooks, host_event)
        app.router.routes.append(Route(f"/{host_event}", endpoint, methods=["POST"]))
    # After the webhooks, as routes of the app itself: since FastAPI 0.137 include_router()
    # adds a wrapper matched lazily on every request, at a cost larger than a webhook's own
    # handling (see retailcrm_service/api/__init__.py).
    operations = operations_router(extra_stats=webhooks.stats, registry=webhooks.registry)
    app.router.routes.extend(operations.routes)
    app.add_middleware(RequestIdMiddleware)
    return app


def build_parser() -> argparse.ArgumentParser:
    from retailcrm_service.cli import OneLineErrorParser, port_number

    parser = OneLineErrorParser(
        prog="vochi-call-service",
        description="The reference call service: host webhooks -> vochi_crm_client -> CRMs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a CRM target (repeatable); default: $VOCHI_CRM_TARGETS or " + DEFAULT_TARGETS,
    )
    parser.add_argument(
        "--forward-internal",
        action="store_true",
        help="also send internal calls (CallType 2) (default: not sent)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default="INFO",
        metavar="LEVEL",
        help=f"log level: {', '.join(LEVELS)} (default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help="key=value text or JSON (default: RETAILCRM_LOG_FORMAT or text)",
    )
    return parser


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> CallServiceSettings:
    raw = args.target or environ.get("VOCHI_CRM_TARGETS", DEFAULT_TARGETS).split(",")
    dsn = environ.get("DATABASE_URL", "").strip()
    if not dsn:
        # Adapters may use the service's plumbing (the library may not): the embedded PostgreSQL.
        from retailcrm_service.storage.database import database_url

        dsn = database_url(None, environ.get("RETAILCRM_DATA_DIR", "").strip() or "./.vochi-data")
    return CallServiceSettings(
        dsn=dsn, targets=parse_targets(raw), forward_internal=args.forward_internal
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vochi-call-service`` console script."""
    import uvicorn

    from retailcrm_service.ops.heap import freeze_startup_objects
    from retailcrm_service.ops.http_server import UVICORN_OPTIONS
    from retailcrm_service.settings import log_format_from

    args = build_parser().parse_args(argv)
    try:
        configure(args.log_level, args.log_format or log_format_from(os.environ))
        settings = settings_from(args, os.environ)
    except ValueError as exc:
        print(f"vochi-call-service: {exc}", file=sys.stderr)
        return 2
    logger.info(
        "call_service.start host=%s port=%d targets=%s",
        args.host,
        args.port,
        sorted(settings.targets),
    )
    app = create_app(settings)
    freeze_startup_objects()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,
        log_config=None,  # uvicorn's loggers go through the one handler of configure()
        **UVICORN_OPTIONS,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
