"""uvicorn with a response's head and body in one write (retailcrm_service.ops.http_server)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from retailcrm_service.ops.http_server import UVICORN_OPTIONS, _Coalescing


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return f"extra:{name}"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


async def test_the_head_goes_out_with_the_body_in_one_write() -> None:
    inner = _Transport()
    transport = _Coalescing(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    assert inner.writes == []
    transport.write(b"{}")
    assert inner.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)  # the pending flush was cancelled: nothing more is written
    assert inner.writes == [HEAD + b"{}"]


async def test_a_head_without_a_body_goes_out_at_the_next_turn_or_at_close() -> None:
    inner = _Transport()
    transport = _Coalescing(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    await asyncio.sleep(0)
    assert inner.writes == [HEAD]
    transport.write(HEAD)
    transport.close()
    assert inner.writes == [HEAD, HEAD]
    assert inner.closed


async def test_continue_and_other_writes_are_never_held() -> None:
    inner = _Transport()
    transport = _Coalescing(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    transport.write(b"5\r\nhello\r\n")
    assert inner.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"5\r\nhello\r\n"]
    assert transport.get_extra_info("peername") == "extra:peername"


async def _stream() -> AsyncIterator[bytes]:
    for part in (b"one,", b"two"):
        await asyncio.sleep(0.01)
        yield part


async def _small(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def _streamed(request: Request) -> Response:
    return StreamingResponse(_stream(), media_type="text/plain")


async def _empty(request: Request) -> Response:
    return Response(status_code=204)


@pytest.fixture
def server() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/small", _small, methods=["GET"]),
            Route("/streamed", _streamed),
            Route("/empty", _empty),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", **UVICORN_OPTIONS)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)


def test_real_responses_of_every_shape_arrive_whole(server: str) -> None:
    with httpx.Client(base_url=server, timeout=5) as http:  # one keep-alive connection
        for _ in range(3):
            assert http.get("/small").json() == {"ok": True}
            head = http.head("/small")
            assert head.status_code == 200
            assert head.headers["content-length"] == "11"
            assert http.get("/streamed").text == "one,two"
            assert http.get("/empty").status_code == 204
