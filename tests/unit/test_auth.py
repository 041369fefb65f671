"""Admin JWTs and the internal-caller rule, without a server."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from starlette.requests import Request

from retailcrm_service.security.admin_auth import (
    TokenInvalid,
    caller_address,
    decode_token,
    is_internal,
    issue_token,
)
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings

SETTINGS = Settings(database_url=Secret("postgresql://x/y"), jwt_secret=Secret("s" * 64))
SESSION = frozenset({"session"})


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_issued_token_decodes_to_its_enterprise_and_version() -> None:
    token = issue_token(SETTINGS, "0367", version=3, ttl_seconds=60)
    claims = decode_token(SETTINGS, token, kinds=SESSION)
    assert (claims.enterprise_number, claims.version, claims.kind) == ("0367", 3, "session")


def test_expired_token_is_refused() -> None:
    token = issue_token(SETTINGS, "0367", version=0, ttl_seconds=60, now=time.time() - 3600)
    with pytest.raises(TokenInvalid, match="expired"):
        decode_token(SETTINGS, token, kinds=SESSION)


def test_alg_none_and_wrong_secret_and_garbage_are_refused() -> None:
    claims = {
        "iss": "retailcrm-service",
        "aud": "retailcrm-admin",
        "sub": "0367",
        "ver": 0,
        "typ": "session",
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
    }
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    wrong = jwt.encode(claims, "another-secret-of-enough-length-" * 3, algorithm="HS256")
    hs512 = jwt.encode(claims, "s" * 64, algorithm="HS512")
    for token in (unsigned, wrong, hs512, "garbage", ""):
        with pytest.raises(TokenInvalid):
            decode_token(SETTINGS, token, kinds=SESSION)


def test_a_login_token_is_not_a_session() -> None:
    token = issue_token(SETTINGS, "0367", version=0, kind="login", ttl_seconds=60)
    with pytest.raises(TokenInvalid):
        decode_token(SETTINGS, token, kinds=SESSION)
    assert decode_token(SETTINGS, token, kinds=frozenset({"login"})).kind == "login"


def _request(peer: str, headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(
        {
            "type": "http",
            "client": (peer, 5555),
            "headers": raw,
            "method": "GET",
            "path": "/",
            "query_string": b"",
        }
    )


def test_loopback_is_internal_and_nginx_real_ip_decides_behind_the_proxy() -> None:
    assert is_internal(_request("127.0.0.1"), SETTINGS)
    assert is_internal(_request("::1"), SETTINGS)
    assert not is_internal(_request("10.1.2.3"), SETTINGS)
    behind = _request("127.0.0.1", {"X-Real-IP": "203.0.113.7"})
    assert caller_address(behind) == "203.0.113.7"
    assert not is_internal(behind, SETTINGS)
    # A remote peer cannot claim loopback through the header.
    assert not is_internal(_request("10.1.2.3", {"X-Real-IP": "127.0.0.1"}), SETTINGS)


def test_internal_token_admits_remote_callers_only_when_it_matches() -> None:
    settings = Settings(
        database_url=Secret("postgresql://x/y"),
        jwt_secret=Secret("s" * 64),
        internal_token=Secret("internal-token-123456"),
    )
    assert is_internal(
        _request("10.1.2.3", {"X-Internal-Token": "internal-token-123456"}), settings
    )
    assert not is_internal(_request("10.1.2.3", {"X-Internal-Token": "wrong"}), settings)
    assert not is_internal(_request("10.1.2.3"), settings)
    assert not is_internal(
        _request("10.1.2.3", {"X-Internal-Token": "internal-token-123456"}), SETTINGS
    )
