"""The sandbox engine: auth, routing, rate limits, faults and the request log around _api."""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio

from retailcrm_service.sandbox._api import ENDPOINTS, Context, Endpoint, match
from retailcrm_service.sandbox._config import SandboxConfig
from retailcrm_service.sandbox._errors import (
    ACCESS_DENIED,
    ACCOUNT_MISSING,
    ACCOUNT_MISSING_HTML,
    API_KEY_MISSING,
    API_KEY_WRONG,
    DOWN_HTML,
    INTERNAL_ERROR,
    METHOD_NOT_ALLOWED,
    METHOD_NOT_FOUND,
    RATE_LIMITED,
    SERVICE_UNAVAILABLE,
    TIMEOUT_HTML,
    ApiError,
    ControlError,
)
from retailcrm_service.sandbox._params import Params, parse_params
from retailcrm_service.sandbox._ratelimit import SlidingWindowLimiter
from retailcrm_service.sandbox._state import Account, ApiKey, SandboxState, mask, redact_module

logger = logging.getLogger(__name__)

FAULT_MODES = ("error", "down", "timeout", "latency")
_ENDPOINT_NAMES = {e.name for e in ENDPOINTS}


@dataclass
class Incoming:
    """What the HTTP layer hands to the engine: an already parsed request."""

    method: str
    path: str
    query: list[tuple[str, str]] = field(repr=False)  # these three may carry the API key
    form: list[tuple[str, str]] = field(repr=False)
    header_key: str | None = field(repr=False)
    base_url: str
    content_type: str = ""


@dataclass
class Outgoing:
    status: int
    body: dict[str, Any] | None = None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


_local_zone: list[Any] = [None, 0.0]  # (the local zone, the epoch second it holds until)


def _utc_now() -> datetime:
    """Now, in the machine's local zone (aware). ``datetime.now().astimezone()`` looks the zone
    up on every call (twice per request); it is looked up once a minute instead, which follows
    a daylight-saving change within the minute it happens on."""
    now = time.time()
    if now >= _local_zone[1]:
        _local_zone[0] = datetime.fromtimestamp(now).astimezone().tzinfo
        _local_zone[1] = (now // 60 + 1) * 60
    return datetime.fromtimestamp(now, _local_zone[0])


def _decode(value: Any) -> Any:
    """Form values as the log shows them: JSON strings decoded, nested keys kept as a tree."""
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def redact_form(params: dict[str, Any]) -> dict[str, Any]:
    """Decoded parameters for the log: no ``apiKey``, module and form ``clientId`` masked."""
    form: dict[str, Any] = _decode({k: v for k, v in params.items() if k != "apiKey"})
    if "integrationModule" in form:
        form["integrationModule"] = redact_module(form["integrationModule"])
    if isinstance(form.get("clientId"), str):
        form["clientId"] = mask(form["clientId"])
    return form


def _redact_reply(body: Any) -> Any:
    """A reply for the log: a module read back (``integration-modules/{code}``) is redacted."""
    if isinstance(body, dict) and isinstance(body.get("integrationModule"), dict):
        return {**body, "integrationModule": redact_module(body["integrationModule"])}
    return body


def _masked_pairs(pairs: list[tuple[str, str]]) -> list[list[str]]:
    return [[k, mask(v) or ""] if k == "apiKey" else [k, v] for k, v in pairs]


class Sandbox:
    """One emulated RetailCRM installation: accounts, state and behaviour switches."""

    def __init__(
        self,
        *,
        config: SandboxConfig,
        seed: Sequence[dict[str, Any]] = (),
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utc_now,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.now = now
        self._stamp: tuple[datetime | None, str] = (None, "")
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.rate_limit = config.rate_limit
        self.state = SandboxState(
            request_log_size=config.request_log_size, default_sites=config.default_sites
        )
        self.limiter = SlidingWindowLimiter(
            limits={"general": config.general_rps, "telephony": config.telephony_rps},
            window=config.rate_window_seconds,
            clock=clock,
        )
        self._initial_seed = [dict(spec) for spec in seed]
        self.reset()

    def timestamp(self) -> str:
        now = self.now()
        second = now.replace(microsecond=0)
        if second != self._stamp[0]:  # strftime once a second, not once per request
            self._stamp = (second, second.strftime("%Y-%m-%d %H:%M:%S"))
        return self._stamp[1]

    # --- control ------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the state the sandbox started with (initial accounts and their seed)."""
        with self.state.lock:
            self.state.clear()
            self.limiter.reset()
            self.rate_limit = self.config.rate_limit
            for spec in self._initial_seed:
                self.state.seed_account(spec, self.timestamp())

    def seed(self, accounts: Sequence[dict[str, Any]]) -> list[Account]:
        """Apply seed documents all or nothing: a bad one leaves the state as it was."""
        state = self.state
        with state.lock:
            saved = copy.deepcopy((state.accounts, state.by_key))
            try:
                return [state.seed_account(spec, self.timestamp()) for spec in accounts]
            except (ControlError, TypeError, ValueError, AttributeError):
                state.accounts, state.by_key = saved
                raise

    def add_fault(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Install a fault on endpoints matching ``endpoint`` (a glob over method names)."""
        endpoint = str(spec.get("endpoint") or "*")
        if not any(fnmatch.fnmatchcase(name, endpoint) for name in _ENDPOINT_NAMES):
            raise ControlError(422, "invalid_fault", f"no endpoint matches {endpoint!r}")
        status = spec.get("status")
        mode = spec.get("mode") or ("error" if status else "latency")
        if mode not in FAULT_MODES:
            raise ControlError(422, "invalid_fault", f"mode must be one of {FAULT_MODES}")
        status = int(status or (500 if mode == "error" else 0))
        if mode == "error" and not 400 <= status <= 599:
            raise ControlError(422, "invalid_fault", "status must be 4xx or 5xx")
        rate = float(spec.get("error_rate", 1.0))
        latency = float(spec.get("latency_ms", 0))
        times = spec.get("times")
        retry_after = spec.get("retry_after")
        if not 0 <= rate <= 1 or latency < 0 or (times is not None and int(times) < 1):
            raise ControlError(
                422, "invalid_fault", "error_rate in [0,1], latency_ms >= 0, times >= 1"
            )
        fault = {
            "id": len(self.state.faults) + 1,
            "endpoint": endpoint,
            "method": (spec.get("method") or "").upper() or None,
            "mode": mode,
            "status": status,
            "error_rate": rate,
            "latency_ms": latency,
            "timeout_seconds": float(
                spec.get("timeout_seconds", self.config.fault_timeout_seconds)
            ),
            "times": None if times is None else int(times),
            "retry_after": None if retry_after is None else str(retry_after),
            "fired": 0,
        }
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    # --- request handling ----------------------------------------------------------------

    async def handle(self, request: Incoming) -> Outgoing:
        started = self.clock()
        entry: dict[str, Any] = {
            "at": self.timestamp(),
            # Wall-clock epoch seconds, comparable with time.time() in other processes on the
            # same machine: what a client measures its end-to-end latency against.
            "receivedTs": round(self.now().timestamp(), 6),
            "method": request.method,
            "path": request.path,
            "query": _masked_pairs(request.query),
            "contentType": request.content_type,
            "auth": None,
            "account": None,
            "endpoint": None,
        }
        try:
            response = await self._handle(request, entry)
        except ApiError as exc:
            response = Outgoing(exc.status, exc.body())
        except Exception:
            # A sandbox bug must look like a RetailCRM 500, and still be logged and visible.
            logger.exception("sandbox.handler_failed path=%s", request.path)
            response = Outgoing(500, {"success": False, "errorMsg": INTERNAL_ERROR})
        entry["status"] = response.status
        entry["response"] = (
            _redact_reply(response.body) if response.body is not None else response.html
        )
        entry["durationMs"] = round((self.clock() - started) * 1000, 3)
        self.state.log_request(entry)
        return response

    def _account_missing(self, method: str) -> Outgoing:
        if method == "GET":
            return Outgoing(404, {"success": False, "errorMsg": ACCOUNT_MISSING})
        return Outgoing(405, html=ACCOUNT_MISSING_HTML)

    async def _handle(self, request: Incoming, entry: dict[str, Any]) -> Outgoing:
        if self.state.account_missing:
            return self._account_missing(request.method)
        endpoints, path_args = match(request.path)
        if not endpoints:
            raise ApiError(404, METHOD_NOT_FOUND)
        endpoint = next((e for e in endpoints if e.method == request.method), None)
        if endpoint is None:
            allow = ", ".join(sorted({e.method for e in endpoints}))
            return Outgoing(
                405, {"success": False, "errorMsg": METHOD_NOT_ALLOWED}, headers={"Allow": allow}
            )
        entry["endpoint"] = endpoint.name
        params = self._params(request)
        entry["form"] = redact_form(params)
        faulted = await self._apply_faults(endpoint, request.method)
        if faulted is not None:
            return faulted
        account, key = self._authenticate(request, params, endpoint, entry)
        if not account.exists:
            return self._account_missing(request.method)
        if self.rate_limit and not self.limiter.allow(key.key, endpoint.bucket):
            self._reject(entry, key, endpoint)
            raise ApiError(503, RATE_LIMITED)
        with self.state.lock:
            context = Context(
                config=self.config,
                account=account,
                key=key,
                params=params,
                path_args=path_args,
                base_url=request.base_url,
                now=self.timestamp(),
                received_ts=entry["receivedTs"],
            )
            status, body = endpoint.handler(context)
        return Outgoing(status, body)

    def _params(self, request: Incoming) -> Params:
        pairs = request.query if request.method == "GET" else request.form
        return parse_params(pairs)

    def _authenticate(
        self, request: Incoming, params: Params, endpoint: Endpoint, entry: dict[str, Any]
    ) -> tuple[Account, ApiKey]:
        key, via = request.header_key, "header"
        if not key:
            key, via = dict(request.query).get("apiKey"), "query"
        if not key:
            key, via = dict(request.form).get("apiKey"), "form"
        if not key:
            raise ApiError(self.config.missing_key_status, API_KEY_MISSING)
        entry["auth"] = {"via": via, "key": mask(key)}
        found = self.state.lookup(key)
        if found is None:
            raise ApiError(self.config.wrong_key_status, API_KEY_WRONG)
        account, api_key = found
        entry["account"] = account.name
        if endpoint.scope is not None and endpoint.scope not in api_key.scopes:
            raise ApiError(self.config.access_denied_status, ACCESS_DENIED)
        return account, api_key

    def _reject(self, entry: dict[str, Any], key: ApiKey, endpoint: Endpoint) -> None:
        with self.state.lock:
            self.state.rejection_count += 1
            self.state.rejections.append(
                {"at": entry["at"], "key": mask(key.key), "endpoint": endpoint.name}
            )

    async def _apply_faults(self, endpoint: Endpoint, method: str) -> Outgoing | None:
        with self.state.lock:
            active = [
                f
                for f in self.state.faults
                if fnmatch.fnmatchcase(endpoint.name, f["endpoint"])
                and f["method"] in (None, method)
                and (f["times"] is None or f["fired"] < f["times"])
            ]
            fired = None
            latency = 0.0
            for fault in active:
                if self.rng.random() >= fault["error_rate"]:
                    continue
                latency += fault["latency_ms"] / 1000
                if fault["mode"] != "latency" and fired is None:
                    fired = fault
                fault["fired"] += 1
        if latency:
            await self.sleep(latency)
        if fired is None:
            return None
        logger.info("sandbox.fault_fired endpoint=%s mode=%s", endpoint.name, fired["mode"])
        if fired["mode"] == "down":
            return Outgoing(502, html=DOWN_HTML)
        if fired["mode"] == "timeout":
            await self.sleep(fired["timeout_seconds"])
            return Outgoing(504, html=TIMEOUT_HTML)
        message = SERVICE_UNAVAILABLE if fired["status"] == 503 else INTERNAL_ERROR
        headers = {} if fired["retry_after"] is None else {"Retry-After": fired["retry_after"]}
        return Outgoing(fired["status"], {"success": False, "errorMsg": message}, headers=headers)
