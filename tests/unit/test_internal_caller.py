"""Who counts as an internal caller when headers are forged, and what settings reveal."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from retailcrm_service.security.admin_auth import PUBLIC_SIDE, caller_address, is_internal
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings

DSN_PASSWORD = "dsn-pass-Qw3rty-9876"
JWT_SECRET = "jwt-secret-" + "k" * 40
SECRET_KEY = "at-rest-key-" + "z" * 30
INTERNAL = "internal-token-" + "t" * 24
SETTINGS = Settings(
    database_url=Secret(f"postgresql://svc:{DSN_PASSWORD}@db.internal:5432/vochi"),
    jwt_secret=Secret(JWT_SECRET),
    secret_key=Secret(SECRET_KEY),
    internal_token=Secret(INTERNAL),
)
PLAIN = Settings(database_url=Secret("postgresql://x/y"), jwt_secret=Secret("s" * 64))


def _request(peer: str, headers: list[tuple[str, str]]) -> Request:
    return Request(
        {
            "type": "http",
            "client": (peer, 40000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            "method": "GET",
            "path": "/api/config/0367",
            "query_string": b"",
        }
    )


REMOTE_SPOOFS = [
    [("X-Real-IP", "127.0.0.1")],
    [("X-Real-IP", "::1")],
    [("X-Real-IP", "::ffff:127.0.0.1")],
    [("X-Forwarded-For", "127.0.0.1")],
    [("X-Forwarded-For", "127.0.0.1"), ("X-Real-IP", "127.0.0.1")],
    [("Forwarded", "for=127.0.0.1")],
    [("X-Real-IP", "127.0.0.1"), ("X-Real-IP", "127.0.0.1")],
    [("Host", "127.0.0.1")],
]


@pytest.mark.parametrize("headers", REMOTE_SPOOFS)
@pytest.mark.parametrize("peer", ["203.0.113.9", "10.0.0.5", "2001:db8::1"])
def test_a_remote_peer_cannot_pass_as_loopback_with_forwarding_headers(
    peer: str, headers: list[tuple[str, str]]
) -> None:
    request = _request(peer, headers)
    assert caller_address(request) == peer
    assert not is_internal(request, PLAIN)


BEHIND_NGINX = [
    "203.0.113.9",
    "203.0.113.9, 127.0.0.1",  # a list is not an address: not loopback
    "localhost",
    "127.0.0.1\r\nX-Internal-Token: x",
    "0177.0.0.1",  # octal spelling is not parsed as loopback
]


@pytest.mark.parametrize("real_ip", BEHIND_NGINX)
def test_behind_nginx_only_a_loopback_real_ip_is_internal(real_ip: str) -> None:
    """nginx overwrites X-Real-IP; anything that is not a loopback address fails closed."""
    assert not is_internal(_request("127.0.0.1", [("X-Real-IP", real_ip)]), PLAIN)


def test_a_local_caller_through_nginx_stays_internal() -> None:
    assert is_internal(_request("127.0.0.1", [("X-Real-IP", "127.0.0.1")]), PLAIN)
    assert is_internal(_request("::1", [("X-Real-IP", "::1")]), PLAIN)


def test_a_wrong_internal_token_is_refused_even_from_loopback() -> None:
    assert not is_internal(_request("127.0.0.1", [("X-Internal-Token", "guess")]), SETTINGS)
    assert not is_internal(_request("127.0.0.1", [("X-Internal-Token", "")]), SETTINGS)
    assert is_internal(_request("198.51.100.1", [("X-Internal-Token", INTERNAL)]), SETTINGS)


def test_internal_token_prefixes_and_case_changes_are_refused() -> None:
    for guess in (INTERNAL[:-1], INTERNAL + "x", INTERNAL.upper(), " " + INTERNAL):
        assert not is_internal(_request("198.51.100.1", [("X-Internal-Token", guess)]), SETTINGS)


def test_nobody_is_internal_on_the_public_side() -> None:
    """Behind a proxy on the same host every public caller is loopback; the port decides."""
    for headers in ([], [("X-Real-IP", "127.0.0.1")], [("X-Internal-Token", INTERNAL)]):
        request = _request("127.0.0.1", headers)
        request.scope[PUBLIC_SIDE] = True
        assert not is_internal(request, SETTINGS)
        assert not is_internal(request, PLAIN)


def test_settings_repr_and_str_hide_every_secret() -> None:
    shown = repr(SETTINGS) + str(SETTINGS) + repr(SETTINGS.database_url)
    for secret in (DSN_PASSWORD, JWT_SECRET, SECRET_KEY, INTERNAL):
        assert secret not in shown
    assert "***" in shown
