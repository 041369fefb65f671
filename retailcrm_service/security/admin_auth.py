"""Who may call what: internal callers, and admins holding a JWT for one enterprise.

FastAPI dependencies:

- ``require_internal``: loopback callers; others only with ``X-Internal-Token`` equal (constant
  time) to ``RETAILCRM_INTERNAL_TOKEN`` when that is set. Behind our nginx the caller is the
  ``X-Real-IP`` nginx sets (it overwrites any client value): remote clients never pass as loopback.
  Nobody is internal on the public side (a request that arrived on ``RETAILCRM_PUBLIC_PORT``,
  marked by ``app._Sides``): behind a proxy on the same host every caller there is loopback.
- ``require_admin``: an admin session JWT (HS256 with ``RETAILCRM_JWT_SECRET``) from
  ``Authorization: Bearer`` or the ``retailcrm_admin_session`` cookie; bound to one enterprise
  (``sub``) and to its current token version (``ver``). Missing/forged/expired/revoked -> 401;
  a token of another enterprise than the path's ``{enterprise_number}`` -> 403.
- ``require_internal_or_admin``: either of the two (the config API).

Sessions: the login flow opens a server-side session (``retailcrm_admin_sessions``) and puts its
id (``sid``) in the session JWT; each use slides its idle limit (``admin_session_idle_seconds``),
it never outlives ``admin_session_ttl_seconds``, and logging out ends it (a copied cookie stops
working). A cookie-authenticated state-changing request must carry the session's CSRF token
(``csrf_token(settings, claims)``, an HMAC of the token id) in ``X-CSRF-Token``; 403 otherwise.

Tokens (all HS256, ``iss=retailcrm-service``, ``aud=retailcrm-admin``; ``typ`` says which):
``session`` (the cookie / bearer), ``login`` (one-time, inside a short-lived link; its ``jti`` is
burnt on use) and ``account`` (the reusable ``accountUrl`` in RetailCRM, revoked with the rest).
``revoke_admin_tokens(conn, n)`` bumps the version. ``admin_link_command(n, ttl_seconds)`` is what
``retailcrm-service token <n>`` prints: ``<public url>/retailcrm-admin/login?token=<login JWT>``;
``GET /retailcrm-admin/login`` swaps it for an HttpOnly cookie and redirects to a clean URL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import Annotated, Any

import asyncpg
import jwt
from fastapi import Depends, Request

from retailcrm_service.errors import ApiError
from retailcrm_service.settings import Settings

logger = logging.getLogger(__name__)

ISSUER = "retailcrm-service"
AUDIENCE = "retailcrm-admin"
SESSION_COOKIE = "retailcrm_admin_session"
COOKIE_PATH = "/retailcrm-admin/"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
ACCOUNT_TOKEN_TTL = 365 * 24 * 3600
_KINDS = frozenset({"session", "login", "account"})


@dataclass(frozen=True, slots=True)
class AdminClaims:
    enterprise_number: str
    version: int
    kind: str
    jti: str
    expires_at: int
    session_id: str | None = None
    via_cookie: bool = False


class TokenInvalid(Exception):
    """The token is not acceptable (the message is safe to show)."""


def issue_token(
    settings: Settings,
    enterprise_number: str,
    *,
    version: int,
    kind: str = "session",
    ttl_seconds: int,
    now: float | None = None,
    session_id: str | None = None,
) -> str:
    if kind not in _KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be > 0")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": enterprise_number,
        "ver": version,
        "typ": kind,
        "jti": secrets.token_urlsafe(16),
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    if session_id is not None:
        claims["sid"] = session_id
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256")


def decode_token(settings: Settings, token: str, *, kinds: frozenset[str]) -> AdminClaims:
    """Verified claims; ``TokenInvalid`` for anything else (alg must be HS256)."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=["HS256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenInvalid("token expired") from None
    except jwt.PyJWTError:
        raise TokenInvalid("invalid token") from None
    kind, version, sub = claims.get("typ"), claims.get("ver"), claims.get("sub")
    if kind not in kinds or not isinstance(version, int) or not isinstance(sub, str):
        raise TokenInvalid("invalid token")
    sid = claims.get("sid")
    if sid is not None and not isinstance(sid, str):
        raise TokenInvalid("invalid token")
    return AdminClaims(
        enterprise_number=sub,
        version=version,
        kind=str(kind),
        jti=str(claims.get("jti") or ""),
        expires_at=int(claims["exp"]),
        session_id=sid,
    )


# -- token versions (revocation) and one-time logins ------------------------------------------


async def current_version(conn: asyncpg.Connection | asyncpg.Pool, enterprise_number: str) -> int:
    value = await conn.fetchval(
        "SELECT version FROM retailcrm_admin_token_versions WHERE enterprise_number = $1",
        enterprise_number,
    )
    return int(value or 0)


async def revoke_admin_tokens(
    conn: asyncpg.Connection | asyncpg.Pool, enterprise_number: str
) -> int:
    """Invalidate every admin token of the enterprise issued so far; returns the new version."""
    value = await conn.fetchval(
        """INSERT INTO retailcrm_admin_token_versions AS v (enterprise_number, version, revoked_at)
           VALUES ($1, 1, now())
           ON CONFLICT (enterprise_number)
           DO UPDATE SET version = v.version + 1, revoked_at = now()
           RETURNING version""",
        enterprise_number,
    )
    logger.info("admin_auth.revoked enterprise=%s", enterprise_number)
    return int(value)


async def burn_login(conn: asyncpg.Connection | asyncpg.Pool, claims: AdminClaims) -> bool:
    """Mark a one-time login token used; False when it was used before."""
    await conn.execute("DELETE FROM retailcrm_admin_login_nonces WHERE expires_at < now()")
    inserted = await conn.fetchval(
        """INSERT INTO retailcrm_admin_login_nonces (jti, enterprise_number, expires_at)
           VALUES ($1, $2, to_timestamp($3)) ON CONFLICT (jti) DO NOTHING RETURNING true""",
        claims.jti,
        claims.enterprise_number,
        claims.expires_at,
    )
    return bool(inserted)


async def check_claims(
    settings: Settings, pool: asyncpg.Pool, token: str, *, kinds: frozenset[str]
) -> AdminClaims:
    """Decoded, signed, unexpired and not revoked; raises ``TokenInvalid`` otherwise.

    A token naming a session (``sid``) is valid only while that session is: not ended, used
    within the idle limit (each use slides it) and younger than its absolute limit.
    """
    claims = decode_token(settings, token, kinds=kinds)
    if claims.version != await current_version(pool, claims.enterprise_number):
        raise TokenInvalid("token revoked")
    if claims.session_id is not None and not await touch_session(
        pool,
        claims.session_id,
        claims.enterprise_number,
        idle_seconds=settings.admin_session_idle_seconds,
    ):
        raise TokenInvalid("session ended")
    return claims


# -- server-side sessions (logout, idle and absolute expiry) ------------------------------------


async def open_session(
    conn: asyncpg.Connection | asyncpg.Pool, enterprise_number: str, *, ttl_seconds: int
) -> str:
    """A new session row (absolute limit ``ttl_seconds`` from now); returns its id."""
    await conn.execute(
        "DELETE FROM retailcrm_admin_sessions WHERE expires_at < now() - interval '1 day'"
    )
    session_id = secrets.token_urlsafe(24)
    await conn.execute(
        """INSERT INTO retailcrm_admin_sessions (id, enterprise_number, expires_at)
           VALUES ($1, $2, now() + make_interval(secs => $3))""",
        session_id,
        enterprise_number,
        float(ttl_seconds),
    )
    return session_id


async def touch_session(
    conn: asyncpg.Connection | asyncpg.Pool,
    session_id: str,
    enterprise_number: str,
    *,
    idle_seconds: int,
) -> bool:
    """Slide a live session's idle limit; False when it ended, idled out or expired."""
    alive = await conn.fetchval(
        """UPDATE retailcrm_admin_sessions SET last_seen_at = now()
           WHERE id = $1 AND enterprise_number = $2 AND revoked_at IS NULL
             AND expires_at > now() AND last_seen_at > now() - make_interval(secs => $3)
           RETURNING true""",
        session_id,
        enterprise_number,
        float(idle_seconds),
    )
    return bool(alive)


async def end_session(conn: asyncpg.Connection | asyncpg.Pool, session_id: str) -> None:
    """Log out: the session (and every copy of its cookie) stops working now."""
    await conn.execute(
        "UPDATE retailcrm_admin_sessions SET revoked_at = now() WHERE id = $1", session_id
    )


def csrf_token(settings: Settings, claims: AdminClaims) -> str:
    """The CSRF token of a session: derived from its token id, so nothing is stored for it."""
    mac = hmac.new(
        settings.jwt_secret.get_secret_value().encode(),
        f"csrf:{claims.enterprise_number}:{claims.jti}".encode(),
        hashlib.sha256,
    )
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


# -- FastAPI dependencies ---------------------------------------------------------------------


def _runtime(request: Request) -> Any:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ApiError(503, "starting", "the service is starting")
    return runtime


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def caller_address(request: Request) -> str | None:
    """The real caller: nginx's ``X-Real-IP`` when the peer is loopback, else the peer."""
    peer = request.client.host if request.client else None
    forwarded = request.headers.get("x-real-ip")
    if forwarded and _is_loopback(peer):
        return forwarded.strip()
    return peer


PUBLIC_SIDE = "retailcrm.public_side"
"""ASGI scope key: set (True) on requests that arrived on the public port."""


def is_public_side(request: Request) -> bool:
    return bool(request.scope.get(PUBLIC_SIDE))


def is_internal(request: Request, settings: Settings) -> bool:
    if is_public_side(request):
        return False
    token = settings.internal_token
    presented = request.headers.get("x-internal-token")
    if token is not None and presented is not None:
        return secrets.compare_digest(presented.encode(), token.get_secret_value().encode())
    return _is_loopback(caller_address(request))


async def require_internal(request: Request) -> None:
    if not is_internal(request, request.app.state.settings):
        raise ApiError(403, "forbidden", "internal route: loopback or X-Internal-Token only")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def presented_token(request: Request) -> str | None:
    return bearer_token(request) or request.cookies.get(SESSION_COOKIE) or None


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def admin_claims(request: Request) -> AdminClaims:
    """The caller's admin session (401 without a valid one); ``via_cookie`` says how it came."""
    token = presented_token(request)
    if not token:
        raise ApiError(
            401, "unauthorized", "admin login required", headers={"WWW-Authenticate": "Bearer"}
        )
    runtime = _runtime(request)
    try:
        claims = await check_claims(
            runtime.settings, runtime.pool, token, kinds=frozenset({"session"})
        )
    except TokenInvalid as exc:
        raise ApiError(
            401, "unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None
    if not bearer_token(request):
        claims = replace(claims, via_cookie=True)
    return claims


def check_csrf(settings: Settings, claims: AdminClaims, presented: str | None) -> None:
    """403 unless ``presented`` is the session's CSRF token (constant-time compare)."""
    expected = csrf_token(settings, claims).encode()
    if not presented or not secrets.compare_digest(presented.encode(), expected):
        raise ApiError(403, "csrf", "missing or wrong CSRF token (X-CSRF-Token)")


async def require_admin(request: Request, enterprise_number: str) -> AdminClaims:
    """An admin of ``enterprise_number`` (401 without a session, 403 for another enterprise).

    A state-changing request authenticated by the cookie must also carry the session's CSRF
    token in ``X-CSRF-Token`` (403 otherwise): a browser sends the cookie on any site's behalf,
    but only our page can read the token. Bearer calls are not cookie-driven and need none.
    """
    claims = await admin_claims(request)
    if not secrets.compare_digest(claims.enterprise_number.encode(), enterprise_number.encode()):
        raise ApiError(403, "forbidden", "the token belongs to another enterprise")
    if claims.via_cookie and request.method not in _SAFE_METHODS:
        check_csrf(request.app.state.settings, claims, request.headers.get(CSRF_HEADER))
    return claims


async def require_internal_or_admin(request: Request, enterprise_number: str) -> AdminClaims | None:
    """None for internal callers, else the admin's claims for this enterprise."""
    if is_internal(request, request.app.state.settings) and not presented_token(request):
        return None
    return await require_admin(request, enterprise_number)


AdminDep = Annotated[AdminClaims, Depends(require_admin)]
"""Route parameter annotation: an admin of the path's ``{enterprise_number}``."""
SessionDep = Annotated[AdminClaims, Depends(admin_claims)]
"""Route parameter annotation: any admin session (no enterprise in the path)."""
InternalOrAdminDep = Annotated[AdminClaims | None, Depends(require_internal_or_admin)]
"""Route parameter annotation: None for internal callers, else the admin's claims."""


# -- the CLI's admin link ---------------------------------------------------------------------


def admin_link(
    settings: Settings, enterprise_number: str, *, version: int, ttl_seconds: int
) -> str:
    token = issue_token(
        settings, enterprise_number, version=version, kind="login", ttl_seconds=ttl_seconds
    )
    return f"{settings.public_base_url}/retailcrm-admin/login?token={token}"


def account_url(settings: Settings, enterprise_number: str, *, version: int) -> str:
    """The ``accountUrl`` registered in RetailCRM: reusable until the tokens are revoked."""
    token = issue_token(
        settings, enterprise_number, version=version, kind="account", ttl_seconds=ACCOUNT_TOKEN_TTL
    )
    return f"{settings.public_base_url}/retailcrm-admin/login?token={token}"


async def _link_for(settings: Settings, enterprise_number: str, ttl_seconds: int) -> str:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM enterprises WHERE number = $1", enterprise_number
        )
        if not exists:
            raise SystemExit(f"no enterprise {enterprise_number!r}")
        version = await current_version(conn, enterprise_number)
    finally:
        await conn.close()
    return admin_link(settings, enterprise_number, version=version, ttl_seconds=ttl_seconds)


def admin_link_command(enterprise_number: str, ttl_seconds: int = 3600) -> str:
    """A short-lived one-time admin link for ``retailcrm-service token <n>``."""
    settings = Settings.from_env()
    return asyncio.run(_link_for(settings, enterprise_number, ttl_seconds))
