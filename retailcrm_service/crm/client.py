"""The one module that speaks RetailCRM API v5's wire format (see docs/retailcrm.md).

``RetailCrmClient(domain=..., api_key=..., http=...)`` talks to one account:

- the key travels only in the ``X-API-KEY`` header, never in a URL, log line or error message;
- POSTs are ``application/x-www-form-urlencoded`` with each entity (``event``, ``calls``,
  ``integrationModule``) as ONE form field holding a JSON string;
- GET queries use PHP bracket notation (``filter[groups][]=manager``) with booleans as ``1``/``0``;
- every call has a timeout (default 3 s); no retries or pacing here (callers add token buckets).

Exception tree (nothing from httpx leaks out)::

    RetailCrmError
     +-- RetailCrmUnavailable        network error, timeout, 5xx, HTML or non-JSON body (retryable)
     |    +-- RetailCrmRateLimited   503 / 429 (``retry_after``: the server's Retry-After in
     |                               seconds, capped; see ``vochi_crm_client.parse_retry_after``)
     +-- RetailCrmApiError           ``success: false`` or other 4xx: status, error_msg, errors
          +-- RetailCrmAuthError     401/403 or a key error message (missing, wrong, access denied)

Methods: ``get_integration_module``, ``edit_integration_module``, ``call_event``, ``calls_upload``
(-> ``UploadResult``), ``telephony_manager``, ``users``, ``user``, ``set_user_status``,
``customers``, ``orders``, ``credentials``, ``api_versions``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from retailcrm_service import __version__
from retailcrm_service.security.secrets import Secret
from vochi_crm_client import parse_retry_after

# The longest Retry-After honoured: a longer one is a server's mistake, and obeying it would park
# a call's rows for as long as it says (the outbox caps its retries the same way).
RETRY_AFTER_CAP = 300.0

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v5"
USER_AGENT = f"retailcrm-service/{__version__}"
AUTH_ERROR_MESSAGES = frozenset(
    {'"apiKey" is missing.', 'Wrong "apiKey" value.', "Access denied.", "Account does not exist."}
)


class AioTransport(AiohttpTransport):
    """httpx requests over aiohttp's connection pool.

    httpx's own pool (httpcore) scans every pooled connection on each request: with one
    connection per busy account it cost about 5 ms of CPU per request at 40 concurrent senders,
    aiohttp's about 1 ms (benchmarks/peak_calls.py: the service's CPU went to httpcore). The
    package maps aiohttp's connection and timeout errors to httpx's; whatever it leaves
    unmapped is raised as ``httpx.TransportError`` here, so callers still catch httpx errors only.
    """

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise httpx.TransportError(type(exc).__name__, request=request) from exc


# How a request to RetailCRM ended, for the metrics: (path, status or None, error or None, seconds).
Observer = Callable[[str, int | None, str | None, float], None]


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    retry_after: str | None
    text: str


class CrmHttp:
    """The HTTP client of RetailCRM accounts (one per instance, shared by every account).

    Requests go straight to aiohttp's pool. Through httpx (over the same pool) each request
    cost the service about a fifth more CPU: building the ``httpx.Request``, the client's
    auth/redirect/cookie machinery and re-streaming the body (benchmarks/peak_calls.py, the
    service's profile at peak). ``RetailCrmClient`` also accepts an ``httpx.AsyncClient`` (the
    unit tests use ``httpx.MockTransport``); both go through the same request building and
    answer interpretation. ``observe`` hears how each request ended (the metrics).
    """

    def __init__(
        self, *, timeout: float, max_connections: int = 100, observe: Observer | None = None
    ) -> None:
        self._timeout = timeout
        self._max_connections = max_connections
        self._observe = observe
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop, as aiohttp requires.
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, keepalive_timeout=5.0, ssl=httpx.create_ssl_context()
        )
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def request(
        self,
        verb: str,
        url: str,
        *,
        path: str,
        headers: list[tuple[str, str]],
        content: bytes,
        seconds: float | None = None,
    ) -> RawResponse:
        """One request (``seconds``: its timeout, else the client's); raises ``TimeoutError``
        or ``ConnectionError`` with the cause chained."""
        session = self._session or self._open()
        limit = self._timeout if seconds is None else seconds
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            async with session.request(
                verb,
                url,
                headers=headers,
                data=content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(sock_connect=limit, sock_read=limit, connect=limit),
            ) as response:
                status = response.status
                body = await response.read()
                return RawResponse(
                    status,
                    response.headers.get("Retry-After"),
                    body.decode(response.get_encoding() if body else "utf-8", errors="replace"),
                )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            error = "timeout"
            raise TimeoutError(f"no answer within {limit} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            error = "unreachable"
            raise ConnectionError(type(exc).__name__) from exc
        finally:
            if self._observe is not None:
                self._observe(path, status, error, time.perf_counter() - started)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> CrmHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# What RetailCrmClient takes as ``http``: the service's CrmHttp, or any httpx.AsyncClient.
CrmHttpClient = CrmHttp | httpx.AsyncClient


def http_client(
    *, timeout: float, max_connections: int = 100, observe: Observer | None = None
) -> CrmHttp:
    """The HTTP client for RetailCRM accounts (see ``CrmHttp``)."""
    return CrmHttp(timeout=timeout, max_connections=max_connections, observe=observe)


class RetailCrmError(Exception):
    """Base of every error this module raises."""

    def __init__(self, message: str, *, status: int | None = None, method: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.method = method

    @property
    def retryable(self) -> bool:
        return False


class RetailCrmUnavailable(RetailCrmError):
    """RetailCRM could not be reached or answered with something that is not its API."""

    @property
    def retryable(self) -> bool:
        return True


class RetailCrmRateLimited(RetailCrmUnavailable):
    """Over the rate limit (503 or 429)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, method=method)
        self.retry_after = retry_after


class RetailCrmApiError(RetailCrmError):
    """RetailCRM refused the request: its ``errorMsg`` and per-field ``errors``."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str = "",
        error_msg: str = "",
        errors: dict[str, Any] | list[Any] | None = None,
    ) -> None:
        super().__init__(message, status=status, method=method)
        self.error_msg = error_msg
        self.errors = errors if errors is not None else {}


class RetailCrmAuthError(RetailCrmApiError):
    """The key is missing, wrong, lacks a scope, or the account does not exist."""


@dataclass(frozen=True, slots=True)
class UploadResult:
    """Outcome of ``telephony/calls/upload``."""

    processed_calls_count: int
    duplicate_calls: tuple[str, ...]


def encode_query(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """PHP bracket notation with 1/0 booleans; ``None`` values are left out."""
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        out.extend(_flatten(str(key), value))
    return out


def _flatten(key: str, value: Any) -> Iterator[tuple[str, str]]:
    if value is None:
        return
    if isinstance(value, bool):
        yield key, "1" if value else "0"
    elif isinstance(value, Mapping):
        for sub, item in value.items():
            yield from _flatten(f"{key}[{sub}]", item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _flatten(f"{key}[]", item)
    else:
        yield key, str(value)


def _json_field(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def normalize_domain(domain: str) -> str:
    """The account base URL without trailing slashes (``https://acme.retailcrm.ru``)."""
    return domain.strip().rstrip("/")


class RetailCrmClient:
    """A client for one RetailCRM account; cheap to build, shares the given httpx client."""

    def __init__(
        self,
        *,
        domain: str,
        api_key: Secret | str,
        http: CrmHttpClient,
        timeout: float = 3.0,
    ) -> None:
        self.domain = normalize_domain(domain)
        self._api_key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        self._http = http
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"RetailCrmClient(domain={self.domain!r}, api_key={self._api_key!r})"

    # -- integration modules (§2) -------------------------------------------------------------

    async def get_integration_module(self, code: str) -> dict[str, Any]:
        body = await self._get(f"{API_PREFIX}/integration-modules/{_segment(code)}")
        return dict(body.get("integrationModule") or {})

    async def edit_integration_module(self, module: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update the module; the path code is the module's ``code``. Returns the body."""
        code = str(module["code"])
        return await self._post(
            f"{API_PREFIX}/integration-modules/{_segment(code)}/edit",
            {"integrationModule": _json_field(module)},
        )

    # -- telephony (§3–§5) --------------------------------------------------------------------

    async def call_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """``telephony/call/event``; the body may list ``notExistCodes`` / ``notExistUsers``."""
        return await self._post(f"{API_PREFIX}/telephony/call/event", {"event": _json_field(event)})

    async def calls_upload(self, calls: Sequence[Mapping[str, Any]]) -> UploadResult:
        body = await self._post(
            f"{API_PREFIX}/telephony/calls/upload", {"calls": _json_field(list(calls))}
        )
        duplicates = body.get("duplicateCalls") or []
        return UploadResult(
            processed_calls_count=int(body.get("processedCallsCount") or 0),
            duplicate_calls=tuple(str(d) for d in duplicates),
        )

    async def telephony_manager(
        self, phone: str, *, details: bool = False, ignore_status: bool = True
    ) -> dict[str, Any]:
        """The whole body: ``manager`` (absent = nobody responsible), ``customer``, ``links``."""
        return await self._get(
            f"{API_PREFIX}/telephony/manager",
            {"phone": phone, "details": details, "ignoreStatus": ignore_status},
        )

    # -- users, customers, orders (§6) ----------------------------------------------------------

    async def users(
        self, *, filters: Mapping[str, Any] | None = None, limit: int = 100, page: int = 1
    ) -> dict[str, Any]:
        """``{"users": [...], "pagination": {...}}``."""
        return await self._get(f"{API_PREFIX}/users", _list_params(filters, limit, page))

    async def user(self, user_id: int | str) -> dict[str, Any]:
        body = await self._get(f"{API_PREFIX}/users/{_segment(str(user_id))}")
        return dict(body.get("user") or {})

    async def set_user_status(self, user_id: int | str, status: str) -> None:
        await self._post(f"{API_PREFIX}/users/{_segment(str(user_id))}/status", {"status": status})

    async def customers(
        self, *, filters: Mapping[str, Any] | None = None, limit: int = 20, page: int = 1
    ) -> dict[str, Any]:
        return await self._get(f"{API_PREFIX}/customers", _list_params(filters, limit, page))

    async def orders(
        self, *, filters: Mapping[str, Any] | None = None, limit: int = 20, page: int = 1
    ) -> dict[str, Any]:
        return await self._get(f"{API_PREFIX}/orders", _list_params(filters, limit, page))

    # -- service methods (unversioned) ---------------------------------------------------------

    async def credentials(self) -> dict[str, Any]:
        """``GET /api/credentials``: the key's allowed methods (``credentials``) and sites."""
        return await self._get("/api/credentials")

    async def api_versions(self) -> dict[str, Any]:
        return await self._get("/api/api-versions")

    # -- transport ----------------------------------------------------------------------------

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return await self._request("GET", path, params=encode_query(params or {}))

    async def _post(self, path: str, form: Mapping[str, str]) -> dict[str, Any]:
        return await self._request("POST", path, data=dict(form))

    async def _request(
        self,
        verb: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        data: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = [
            ("X-API-KEY", self._api_key.get_secret_value()),
            ("Accept", "application/json"),
            ("User-Agent", USER_AGENT),
        ]
        content = b""
        if data is not None:
            content = urlencode(data).encode("ascii")
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
        url = self.domain + path
        if params:
            url = str(httpx.URL(url, params=params))
        try:
            if isinstance(self._http, CrmHttp):
                raw = await self._http.request(
                    verb, url, path=path, headers=headers, content=content, seconds=self._timeout
                )
            else:
                raw = await _via_httpx(self._http, verb, url, headers, content, self._timeout)
        except TimeoutError as exc:
            logger.info("retailcrm.timeout method=%s path=%s", verb, path)
            raise RetailCrmUnavailable(f"timeout calling {path}", method=path) from exc
        except ConnectionError as exc:
            logger.info("retailcrm.unreachable method=%s path=%s error=%s", verb, path, exc)
            raise RetailCrmUnavailable(f"cannot reach RetailCRM ({exc})", method=path) from exc
        logger.debug("retailcrm.response method=%s path=%s status=%s", verb, path, raw.status)
        return _interpret(raw, path)


async def _via_httpx(
    http: httpx.AsyncClient,
    verb: str,
    url: str,
    headers: list[tuple[str, str]],
    content: bytes,
    seconds: float,
) -> RawResponse:
    """The same request through an ``httpx.AsyncClient``, with ``CrmHttp``'s errors."""
    request = httpx.Request(
        verb,
        url,
        headers=headers,
        content=content,
        extensions={"timeout": httpx.Timeout(seconds).as_dict()},
    )
    try:
        response = await http.send(request)
    except httpx.TimeoutException as exc:
        raise TimeoutError(f"no answer within {seconds} s") from exc
    except httpx.HTTPError as exc:
        raise ConnectionError(type(exc).__name__) from exc
    return RawResponse(response.status_code, response.headers.get("Retry-After"), response.text)


def _interpret(response: RawResponse, path: str) -> dict[str, Any]:
    status = response.status
    if status in (429, 503):
        raise RetailCrmRateLimited(
            f"rate limited (HTTP {status})",
            status=status,
            method=path,
            retry_after=parse_retry_after(response.retry_after, cap=RETRY_AFTER_CAP),
        )
    text = response.text
    if text.lstrip().startswith("<"):
        raise RetailCrmUnavailable(
            f"HTTP {status} with an HTML body: the account may not exist",
            status=status,
            method=path,
        )
    if status >= 500:
        raise RetailCrmUnavailable(f"server error (HTTP {status})", status=status, method=path)
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise RetailCrmUnavailable(
            f"HTTP {status} with a body that is not JSON", status=status, method=path
        ) from exc
    if not isinstance(body, dict):
        raise RetailCrmUnavailable(
            f"HTTP {status} with an unexpected JSON body", status=status, method=path
        )
    if status < 400 and body.get("success", True) is not False:
        return body
    error_msg = str(body.get("errorMsg") or f"HTTP {status}")
    errors = body.get("errors")
    if not isinstance(errors, (dict, list)):
        errors = {}
    kind = (
        RetailCrmAuthError
        if status in (401, 403) or error_msg in AUTH_ERROR_MESSAGES
        else RetailCrmApiError
    )
    raise kind(error_msg, status=status, method=path, error_msg=error_msg, errors=errors)


def _list_params(filters: Mapping[str, Any] | None, limit: int, page: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, "page": page}
    if filters:
        params["filter"] = dict(filters)
    return params


def _segment(value: str) -> str:
    """A path segment; refuses anything that could change the path."""
    if not value or any(c in value for c in "/?#%\\") or value in (".", ".."):
        raise ValueError(f"invalid path segment {value!r}")
    return value
