"""Real HTTP servers on 127.0.0.1 for the dispatch and call-service tests.

``ThreadedServer`` runs any ASGI app under uvicorn in a thread with its own event loop, on a port
it picked free; it can go down and come back on the same port (while down, the port stays bound
but not listening, so connections are refused and no other process can take it).
``RecordingReceiver`` is a minimal CRM service: it records every POST /api/events and answers 202
per ARCHITECTURE.md §4, counting repeated idempotency keys as duplicates.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

ASGIApp = Callable[..., Any]


def _bound_socket(port: int = 0, *, listen: bool = True) -> socket.socket:
    # proto=IPPROTO_TCP: asyncio then sets TCP_NODELAY on accepted sockets (no 40 ms Nagle stalls).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    if listen:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


class ThreadedServer:
    """uvicorn in a background thread; ``stop()`` / ``start()`` keep the same port."""

    def __init__(self, app: ASGIApp, *, lifespan: str = "auto") -> None:
        self.app = app
        self.lifespan = lifespan
        self._placeholder: socket.socket | None = _bound_socket(listen=False)
        self.port: int = self._placeholder.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        assert self._server is None, "already running"
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        sock = _bound_socket(self.port)
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan=self.lifespan, access_log=False
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self, *, hold_port: bool = True) -> None:
        """Shut down (draining open requests); with ``hold_port``, keep the port refused."""
        if self._server is None:
            return
        self._server.should_exit = True
        assert self._thread is not None
        self._thread.join(30)
        self._server = None
        if hold_port:
            self._placeholder = _bound_socket(self.port, listen=False)

    def close(self) -> None:
        self.stop(hold_port=False)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def __enter__(self) -> ThreadedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
