"""The RetailCRM stand-in: the product's sandbox, rate limits on, one account per enterprise.

In front of the sandbox app sits a benchmark-only tap (the sandbox itself is unchanged):

- it counts every API request by path and status (the sandbox's own request log keeps only
  the last 2000);
- ``GET /_bench/receipts`` returns what arrived since the previous call: each
  ``telephony/call/event`` as ``[callExternalId, type, codes, receivedTs]``, each newly stored
  call of ``telephony/calls/upload`` as ``[externalId, receivedTs]`` (``receivedTs`` is the
  sandbox's own arrival time, wall-clock seconds), the rate-limit rejections and the request
  counts so far. It reads the engine's records directly instead of ``/_sandbox/state``, which
  deep-copies every account on each call, and then drops the event log and the closed popups it
  has read, so that the stand-in's memory does not grow with every call of the run (stored calls
  stay: they deduplicate re-uploads).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retailcrm_service.ops.heap import freeze_startup_objects
from retailcrm_service.ops.http_server import UVICORN_OPTIONS
from retailcrm_service.sandbox import Sandbox, create_sandbox_app

RECEIPTS = "/_bench/receipts"


def accounts(keys: dict[str, str], users: dict[str, str]) -> list[dict[str, Any]]:
    """One account per enterprise (name -> API key), each with the users of ``users``."""
    people = [
        {"id": int(uid), "firstName": f"Manager {ext}", "status": "free", "online": True}
        for uid, ext in users.items()
    ]
    return [
        {"name": name, "api_key": key, "demo": False, "users": people} for name, key in keys.items()
    ]


class Tap:
    """ASGI middleware: request counts, and the receipts endpoint."""

    def __init__(self, app: ASGIApp, sandbox: Sandbox) -> None:
        self.app = app
        self.sandbox = sandbox
        self.requests: Counter[str] = Counter()
        self.read_calls: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == RECEIPTS:
            body = json.dumps(self.receipts()).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if path.startswith("/_sandbox/"):
            await self.app(scope, receive, send)
            return
        status = [0]

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            self.requests[f"{path.removeprefix('/api/v5/')} {status[0]}"] += 1

    def receipts(self) -> dict[str, Any]:
        state = self.sandbox.state
        popups: list[list[Any]] = []
        calls: list[list[Any]] = []
        with state.lock:
            for name, account in state.accounts.items():
                for record in account.events:
                    event = record["event"]
                    popups.append(
                        [
                            event.get("callExternalId"),
                            event.get("type"),
                            event.get("codes") or [],
                            record["receivedTs"],
                        ]
                    )
                account.events.clear()
                account.popups[:] = [p for p in account.popups if p["state"] == "open"]
                start = self.read_calls.get(name, 0)
                calls.extend([c.get("externalId"), c["receivedTs"]] for c in account.calls[start:])
                self.read_calls[name] = len(account.calls)
            rejected = state.rejection_count
        return {
            "popups": popups,
            "calls": calls,
            "rate_limited": rejected,
            "requests": dict(self.requests),
        }


def serve(port: int, accounts_path: str) -> None:
    with open(accounts_path, encoding="utf-8") as fh:
        seed = json.load(fh)
    app = create_sandbox_app(accounts=seed, rate_limit=True)
    logging.basicConfig(level=logging.WARNING)
    freeze_startup_objects()
    uvicorn.run(
        Tap(app, app.state.sandbox),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        **UVICORN_OPTIONS,
    )
