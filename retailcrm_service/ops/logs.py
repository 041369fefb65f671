"""One log format for our loggers and uvicorn's, request ids, and no secret in any line.

``configure(level, fmt)`` installs one handler on the root logger (uvicorn is run with
``log_config=None``, so its loggers propagate to it):

- ``text``: ``ts=... level=info logger=... request_id=... event=runtime.started parts=events``.
  Our messages are ``"<event> key=%s ..."``; every argument is quoted when it needs to be (a
  space, a quote, ``=`` or nothing at all), so every line splits into ``key=value`` pairs with
  a shell-like tokenizer. A message that is not of that shape (a third party's) is ``msg="..."``.
- ``json``: one object per line with the same keys (``ts``, ``level``, ``logger``,
  ``request_id``, ``event``, the message's fields, or ``msg``), and ``exc`` for a traceback.

Request ids: ``RequestIdMiddleware`` takes ``X-Request-ID`` from the request when it is a sane
token (else makes one), keeps it in ``REQUEST_ID`` for the request's logs and returns it in the
response. The call service passes it on to its batch POSTs (``adapters/call_service.py``).

Secrets: every line goes through ``redact``: a DSN's password becomes ``***`` and any value given
to ``register_secret`` (the settings' secrets, at start-up) is masked, whatever logged it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import random
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retailcrm_service.security.secrets import mask

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS: Final = ("text", "json")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# One id, or several joined by commas (a batch carrying events of several requests).
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}(,[A-Za-z0-9._:-]{1,128}){0,15}")
_BARE: Final = re.compile(r"[^\s\"'=\\]+")
_EVENT_LINE: Final = re.compile(r"([a-z][\w.]*)((?: [\w.]+=(?:\"(?:[^\"\\]|\\.)*\"|\S*))*)")
_FIELD: Final = re.compile(r"([\w.]+)=(\"(?:[^\"\\]|\\.)*\"|\S*)")
_DSN_PASSWORD: Final = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)
_secrets: set[str] = set()
HANDLER_NAME: Final = "vochi-log"
# Chatty third-party loggers: pgserver echoes initdb's output, httpx logs every request.
_QUIET: Final = ("pgserver", "httpx", "httpcore")


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line (values under 8 characters are too
    short to find safely and are never secrets here)."""
    if value and len(value) >= 8:
        _secrets.add(value)


def redact(text: str) -> str:
    text = _DSN_PASSWORD.sub(r"\1***@", text)
    for value in _secrets:
        if value in text:
            text = text.replace(value, mask(value))
    return text


def quote(value: Any) -> str:
    """``value`` as a ``key=value`` value: bare when it is one plain token, else double-quoted."""
    text = value if isinstance(value, str) else str(value)
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _quoted_args(args: Any) -> Any:
    if isinstance(args, tuple):
        return tuple(a if isinstance(a, (int, float)) else quote(a) for a in args)
    return args


def _fields(record: logging.LogRecord) -> tuple[str | None, list[tuple[str, str]], str]:
    """(event, [(key, raw value)], the message) of a record, arguments quoted."""
    try:
        message = str(record.msg) % _quoted_args(record.args) if record.args else str(record.msg)
    except (TypeError, ValueError):
        message = record.getMessage()
    message = redact(message)
    match = _EVENT_LINE.fullmatch(message)
    if match is None:
        return None, [], message
    return match.group(1), _FIELD.findall(match.group(2)), message


def _unquote(raw: str) -> str:
    if raw.startswith('"'):
        try:
            return str(json.loads(raw))
        except ValueError:
            return raw
    return raw


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self._json = fmt == "json"

    def _timestamp(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        event, fields, message = _fields(record)
        head: list[tuple[str, str]] = [
            ("ts", self._timestamp(record)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
        ]
        request_id = REQUEST_ID.get()
        if request_id:
            head.append(("request_id", request_id))
        exc = redact(self.formatException(record.exc_info)) if record.exc_info else None
        if self._json:
            out: dict[str, Any] = dict(head)
            if event is None:
                out["msg"] = message
            else:
                out["event"] = event
                for key, raw in fields:
                    out.setdefault(key, _unquote(raw))
            if exc:
                out["exc"] = exc
            return json.dumps(out, ensure_ascii=False, default=str)
        parts = [f"{key}={quote(value)}" for key, value in head]
        if event is None:
            parts.append(f"msg={quote(message)}")
        else:
            parts.append(f"event={event}")
            parts += [f"{key}={raw}" for key, raw in fields]
        if exc:
            parts.append(f"exc={quote(exc)}")
        return " ".join(parts)


def configure(
    level: str = "INFO", fmt: str = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """One handler on the root logger for every logger, uvicorn's included; returns it."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME:  # ours from an earlier call; others stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


def valid_request_id(value: str | None) -> str | None:
    """``value`` when it is usable as a request id (a token, or up to 16 joined by commas)."""
    if value and _REQUEST_ID_RE.fullmatch(value):
        return value
    return None


_IDS: Final = random.Random()  # seeded from os.urandom; ids are labels, not secrets


def new_request_id() -> str:
    """32 random hex digits (uuid4 read 16 bytes from the kernel per request: a visible share of
    a webhook's cost, for an id that needs to be unique, not unguessable)."""
    return f"{_IDS.getrandbits(128):032x}"


def request_id_of(scope: Scope) -> str:
    """The request's ``X-Request-ID`` when usable, else a new id."""
    return valid_request_id(_header(scope["headers"], b"x-request-id")) or new_request_id()


class RequestIdMiddleware:
    """Takes ``X-Request-ID`` (or makes one), exposes it as ``REQUEST_ID`` and returns it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
