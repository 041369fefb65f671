"""CrmHttp, the service's RetailCRM client over aiohttp's pool, on real sockets: the sandbox
answering, a port nobody listens on, and a server that accepts and never answers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from retailcrm_service.crm.client import (
    CrmHttp,
    RetailCrmAuthError,
    RetailCrmClient,
    RetailCrmUnavailable,
    http_client,
)
from retailcrm_service.sandbox import SandboxServer

Seen = list[tuple[str, int | None, str | None]]


@pytest.fixture
def crm() -> Iterator[SandboxServer]:
    with SandboxServer(rate_limit=False, demo_data=False) as server:
        yield server


@pytest.fixture
async def seen_http() -> AsyncIterator[tuple[CrmHttp, Seen]]:
    seen: Seen = []
    async with http_client(
        timeout=3.0, observe=lambda path, status, error, _s: seen.append((path, status, error))
    ) as http:
        yield http, seen


async def test_requests_reach_the_sandbox_with_the_key_in_its_header(
    crm: SandboxServer, seen_http: tuple[CrmHttp, Seen]
) -> None:
    http, seen = seen_http
    client = RetailCrmClient(domain=crm.url, api_key=crm.api_key, http=http)
    assert (await client.credentials())["success"] is True
    wrong = RetailCrmClient(domain=crm.url, api_key="wrong-key", http=http)
    with pytest.raises(RetailCrmAuthError):
        await wrong.credentials()
    assert seen == [("/api/credentials", 200, None), ("/api/credentials", 403, None)]


async def test_a_port_nobody_listens_on_is_unavailable_not_an_aiohttp_error(
    seen_http: tuple[CrmHttp, Seen],
) -> None:
    http, seen = seen_http
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = RetailCrmClient(domain=f"http://127.0.0.1:{port}", api_key="k" * 32, http=http)
        with pytest.raises(RetailCrmUnavailable, match="cannot reach RetailCRM") as caught:
            await client.call_event({"phone": "+375291234567", "type": "in"})
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert "k" * 32 not in str(caught.value)
    assert seen == [("/api/v5/telephony/call/event", None, "unreachable")]


async def test_a_server_that_never_answers_times_out(seen_http: tuple[CrmHttp, Seen]) -> None:
    http, seen = seen_http
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = RetailCrmClient(
            domain=f"http://127.0.0.1:{port}", api_key="k" * 32, http=http, timeout=0.3
        )
        with pytest.raises(RetailCrmUnavailable, match="timeout"):
            await client.users()
    finally:
        server.close()
    assert seen == [("/api/v5/users", None, "timeout")]


async def test_closing_twice_is_harmless_and_a_closed_client_opens_again(
    crm: SandboxServer,
) -> None:
    http = http_client(timeout=3.0)
    client = RetailCrmClient(domain=crm.url, api_key=crm.api_key, http=http)
    await client.credentials()
    await http.aclose()
    await http.aclose()
    assert (await client.credentials())["success"] is True
    await http.aclose()


async def test_an_answer_in_a_charset_python_does_not_know_is_still_read(
    seen_http: tuple[CrmHttp, Seen],
) -> None:
    body = '{"success": true, "credentials": ["/api/v5/users"], "siteAccess": "всё"}'.encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=no-such-charset\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    http, seen = seen_http
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = RetailCrmClient(domain=f"http://127.0.0.1:{port}", api_key="k" * 32, http=http)
        assert (await client.credentials())["siteAccess"] == "всё"
    finally:
        server.close()
    assert seen == [("/api/credentials", 200, None)]
