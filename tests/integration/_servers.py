"""A recording CRM service for the dispatch and call-service tests (run it with
``tests.support.procs.ThreadedServer``).

``RecordingReceiver`` is a minimal CRM service: it records every POST /api/events and answers 202
per README.md's routes, counting repeated idempotency keys as duplicates.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Received:
    at: float  # time.monotonic() when the POST arrived
    batch: int  # ordinal of the POST
    event: dict[str, Any]


class RecordingReceiver:
    """An ASGI app recording every event POSTed to /api/events; answers 202 per the contract."""

    def __init__(self) -> None:
        self.delay = 0.0  # seconds to wait before answering (a slow CRM service)
        self.received: list[Received] = []
        self.batches = 0
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.event for r in self.received]

    @property
    def keys(self) -> list[str]:
        return [e["idempotency_key"] for e in self.events]

    def wait_for(self, predicate: Callable[[RecordingReceiver], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != "/api/events" or scope["method"] != "POST":
            await self._reply(send, 404, {"error": {"code": "not_found", "message": "no"}})
            return
        arrived = time.monotonic()
        if self.delay:
            await asyncio.sleep(self.delay)
        events = json.loads(body)["events"]
        duplicates = 0
        with self._lock:
            self.batches += 1
            for event in events:
                key = event["idempotency_key"]
                if key in self._keys:
                    duplicates += 1
                self._keys.add(key)
                self.received.append(Received(arrived, self.batches, event))
        reply = {"accepted": len(events) - duplicates, "duplicates": duplicates, "rejected": []}
        await self._reply(send, 202, reply)

    @staticmethod
    async def _reply(send: Any, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
