"""uvicorn's HTTP protocol, with a response's head and body sent in one write.

uvicorn writes the status line and headers as soon as the app sends ``http.response.start``,
then the body in a second write: two sends, two TCP segments and, over loopback, two wake-ups
of the client for every response. The call service (a webhook per host event), the service and
the sandbox answer small responses at high rates, so this protocol holds the head until the
body's first write and sends both together. A head whose body does not follow at once (a
streamed response, HEAD, a 304) goes out at the event loop's next turn, and before the
connection closes. ``100 Continue`` is never held.

Use it as ``uvicorn.run(app, http=HttpProtocol)`` (``UVICORN_OPTIONS`` has it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 "


class _Coalescing:
    """The connection's transport, but for holding a response head until the next write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._flush_soon: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        if head is not None:
            self._head = None
            assert self._flush_soon is not None
            self._flush_soon.cancel()
            self._transport.write(head + bytes(data))
            return
        if (
            isinstance(data, bytes)
            and data.startswith(_HEAD_START)
            and data.endswith(_HEAD_END)
            and not data.startswith(_CONTINUE)
        ):
            self._head = data
            self._flush_soon = self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over ``_Coalescing`` (see the module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _Coalescing(transport, self.loop)  # type: ignore[assignment]


UVICORN_OPTIONS: dict[str, Any] = {"http": HttpProtocol}
"""What every server of this repository passes to uvicorn."""
