"""Start-up guard for running several service instances on one PostgreSQL (docs/operations.md).

Instances share the work through the database (outbox claims, pacing shares) and must share two
things that a development set-up makes up on its own: the database itself (``DATABASE_URL``; an
instance without it starts its private embedded PostgreSQL) and the JWT secret
(``RETAILCRM_JWT_SECRET``; an instance without it generates one, so an admin session signed by
one instance is refused by the next). ``check_scale_out`` refuses to start such an instance while
another one is registered as alive on the same database, and warns when it starts alone.
"""

from __future__ import annotations

import logging
import os
import socket

import asyncpg

from retailcrm_service.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

# Delivery heartbeats every second and counts instances seen within 5 s (DeliveryConfig).
ALIVE_WITHIN = 5.0


def _is_stale(owner: str) -> bool:
    """A row of a process of this host that no longer runs (a restart after a crash)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def other_instances(dsn: str, within: float = ALIVE_WITHIN) -> list[str]:
    """The lease owners of the instances registered as alive on this database."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT owner FROM retailcrm_delivery_instances"
            " WHERE seen_at >= now() - make_interval(secs => $1) ORDER BY owner",
            within,
        )
    finally:
        await conn.close()
    return [r["owner"] for r in rows if not _is_stale(r["owner"])]


async def check_scale_out(settings: Settings) -> None:
    """Raise ``SettingsError`` when this instance would join others with a set-up that cannot be
    shared (see the module docstring); warn when it runs alone with one."""
    unsafe = []
    if settings.embedded_database:
        unsafe.append("DATABASE_URL is unset (a private embedded PostgreSQL)")
    if settings.jwt_secret_generated:
        unsafe.append("RETAILCRM_JWT_SECRET is unset (a secret generated for this instance)")
    if not unsafe:
        return
    others = await other_instances(settings.database_url.get_secret_value())
    if others:
        raise SettingsError(
            f"refusing to start beside {len(others)} running instance(s) ({others[0]}): "
            + " and ".join(unsafe)
            + "; every instance needs the same DATABASE_URL and RETAILCRM_JWT_SECRET"
        )
    logger.warning(
        "instances.development_setup reason=%s (fine for one instance; several instances "
        "need one DATABASE_URL and one RETAILCRM_JWT_SECRET, see docs/operations.md)",
        "; ".join(unsafe),
    )
