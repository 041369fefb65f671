"""A local emulator of the RetailCRM API v5 telephony subset (``retailcrm-service sandbox``).

It follows ``docs/retailcrm.md`` (its Sandbox section first), not our client. Accounts are told
apart by
API key; an account's base URL (the ``domain`` a client is configured with) is the server's root,
so requests go to ``<url>/api/v5/...``.

In-process (tests)::

    from retailcrm_service.sandbox import SandboxServer, AsyncSandboxServer

    with SandboxServer(rate_limit=False) as crm:  # uvicorn in a thread, free 127.0.0.1 port
        crm.url, crm.api_key                     # account base URL; key of the account "test"
        crm.state()                              # == GET /_sandbox/state (dict)
        crm.seed({...}); crm.reset(); crm.add_fault(endpoint="telephony/*", status=503)
        crm.control.click_to_call(user_id=1, phone="+375291234567")  # HTTP control client

    async with AsyncSandboxServer() as crm:       # same, served by the running event loop
        await crm.control.set_user_status(user_id=1, status="busy")

Both take keyword arguments: ``api_key`` (default: a random one), ``accounts`` (seed documents,
replacing the default account), ``demo_data=True`` (the default account gets the demo users,
customers and orders), ``config=SandboxConfig(...)``, ``rate_limit`` (overrides the config),
``clock``, ``now``, ``sleep``, ``rng``, ``callback_transport``. ``create_sandbox_app(...)`` returns
the bare Starlette app (``app.state.sandbox`` is the :class:`Sandbox` engine) with the same
keywords plus ``api_keys=[...]`` (one full-access account per key).

Seed document (``POST /_sandbox/seed {"accounts": [...]}``; an existing name is extended)::

    {"name": "acme", "api_key": "KEY", "scopes": [...]  (default: every scope in SCOPES),
     "key_sites": null, "api_keys": [{"key": "KEY2", "scopes": ["user_read"], "sites": ["main"]}],
     "sites": ["main"], "exists": true,
     "demo": false, "users": [{"id": 7, "firstName": "Ann", "status": "free", "online": true,
     "groups": ["manager"], ...}], "customers": [{"id": 15, "phones": ["+79001234567"],
     "managerId": 7, ...}], "orders": [{"id": 1, "customerId": 15, "managerId": 7, ...}]}

Control API (JSON; errors as ``{"error": {"code", "message"}}``):

- ``GET /_sandbox/state[?account=NAME&requests=N&since=SEQ]``: ``accounts`` (masked keys with
  scopes and sites, users, customers, orders, ``modules`` with ``history``, ``events``,
  ``popups`` and ``openPopups`` per user id, ``calls`` with ``duplicates`` counts,
  ``statusChanges``), ``requests`` (seq, method, path, masked query, ``auth`` {via, masked
  key}, decoded ``form`` (the query for GET), status, response; ``since`` keeps entries with a
  larger ``seq``, ``requests`` the last N), ``rateLimitRejections`` {count, recent},
  ``callbacks`` (each with its response), ``faults``. Module ``clientId`` values are masked.
  Requests, ``events`` and ``calls`` carry ``receivedTs``: when the request arrived, in
  wall-clock epoch seconds (the ``now`` clock; a re-uploaded call keeps its first), so a client
  on the same machine can measure end-to-end latency with ``time.time()``.
- ``POST /_sandbox/reset``: back to the accounts the sandbox started with.
- ``POST /_sandbox/seed``: see above.
- ``POST|GET|DELETE /_sandbox/faults``: ``{"endpoint": "telephony/*" (glob over method names such as
  ``telephony/call/event``, ``integration-modules/{code}/edit``), "method": "POST"?, "mode":
  "error"|"down"|"timeout"|"latency", "status": 500|503, "error_rate": 1.0, "latency_ms": 0,
  "times": N?, "timeout_seconds": 30, "retry_after": "120"?}``. ``down`` answers 502 HTML,
  ``timeout`` stalls then 504; ``retry_after`` is sent verbatim as an error's ``Retry-After``.
- ``POST /_sandbox/settings``: ``{"rate_limit": bool, "account_missing": bool,
  "account_exists": bool, "account": NAME}`` (account missing: 404 JSON on GET, 405 HTML on POST).
- ``POST /_sandbox/callbacks/click-to-call`` ``{"userId", "phone", "account"?, "site"?,
  "method": "GET"|"POST", "module"?}`` -> ``makeCallUrl`` with clientId, code, phone, userId,
  externalPhone; ``POST /_sandbox/callbacks/user-status`` ``{"userId", "status", "method"?}`` ->
  updates the user, then ``changeUserStatusUrl`` with clientId, userId, code, status;
  ``POST /_sandbox/callbacks/activity`` ``{"code", "active", "freeze"}`` -> POST form to
  ``baseUrl`` + ``actions.activity`` with clientId, activity JSON, systemUrl;
  ``POST /_sandbox/callbacks/account-url`` ``{"code"}`` -> POST form clientId to ``accountUrl``
  (the module's settings link). Each answers
  ``{"callback": record | null}``; records (clientId masked) are also in the state.

Order of checks: unknown-account mode, routing (404 ``API method not found``, 405), faults,
``apiKey`` (header ``X-API-KEY``, then query, then form), scope, rate limit (per key, after auth),
then the method. Demo data (``demo``): users 1–5 (2 busy, 3 at dinner, 4 offline, 5 an admin),
customers 101–104 with phones from the shared fixtures and managers 1, 2, -, 4, orders 1001–1003.

Choices where the doc says UNCONFIRMED (``*`` = a :class:`SandboxConfig` switch): missing key
401*, wrong key 403*, missing scope 403*; ``Telephony not enabled`` 400*; entity field errors 400
``Errors in the entity format`` with an ``errors`` map keyed by field path; bad GET parameters 400
``Errors in the input parameters``; numeric booleans only*; module edit answers 201 on create,
200 on update, replaces* the stored object and keeps only documented keys; an event needs the
caller's key to own an active, unfrozen module with ``integrations.telephony``; a calls upload is
all-or-nothing (at most 50* calls) and ``processedCallsCount`` counts the calls newly stored;
telephony/manager skips a manager whose status is not ``free``* unless ``ignoreStatus=1``, and
without one omits ``manager``*; rate limits* are sliding one-second windows, 10 general and 40
for ``telephony/*`` (the 11th request inside one second gets 503 ``Rate limit exceeded``).
"""

from retailcrm_service.sandbox._config import SCOPES, SandboxConfig
from retailcrm_service.sandbox._core import Sandbox
from retailcrm_service.sandbox._errors import ApiError, ControlError, SandboxError
from retailcrm_service.sandbox._http import create_sandbox_app
from retailcrm_service.sandbox._server import (
    AsyncSandboxControl,
    AsyncSandboxServer,
    SandboxControl,
    SandboxServer,
    cli_accounts,
    serve,
)
from retailcrm_service.sandbox._state import mask

__all__ = [
    "SCOPES",
    "ApiError",
    "AsyncSandboxControl",
    "AsyncSandboxServer",
    "ControlError",
    "Sandbox",
    "SandboxConfig",
    "SandboxControl",
    "SandboxError",
    "SandboxServer",
    "cli_accounts",
    "create_sandbox_app",
    "mask",
    "serve",
]
