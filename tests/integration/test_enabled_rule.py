"""One "enabled" rule: the call services' matrix, the service's config cache and the outbox
agree on every shape of ``integrations_config`` the platform may hold."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from retailcrm_service.pipeline.intake import validated
from retailcrm_service.pipeline.outbox import encode_row, insert_rows
from retailcrm_service.storage.enterprise_configs import load_config
from tests.support.pg import create_enterprise
from vochi_crm_client import EnablementMatrix, enabled_sql

SHAPES: list[tuple[bool, dict[str, Any] | None]] = [
    (True, {"retailcrm": {"enabled": True}}),
    (True, {"retailcrm": {"enabled": "true"}}),
    (True, {"retailcrm": {"enabled": False}}),
    (True, {"retailcrm": {"enabled": "yes"}}),
    (True, {"retailcrm": {}}),
    (True, {"retailcrm": "enabled"}),
    (True, {"uon": {"enabled": True}}),
    (True, {}),
    (False, {"retailcrm": {"enabled": True}}),
]


@pytest.mark.parametrize(("active", "integrations"), SHAPES)
async def test_matrix_config_cache_and_outbox_agree_on_enabled(
    db: asyncpg.Connection,
    database_url: str,
    active: bool,
    integrations: dict[str, Any] | None,
) -> None:
    await create_enterprise(db, "0367", active=active, integrations=integrations)
    async with EnablementMatrix(dsn=database_url, listen=False) as matrix:
        in_matrix = "retailcrm" in await matrix.integrations_for("0367")
    config = await load_config(db, "0367", secret_key=None)
    assert config is not None
    event = validated(
        {"enterprise_number": "0367", "event_type": "hangup", "payload": {"UniqueId": "1.1"}}
    )
    await insert_rows(db, {("0367", event.idempotency_key): encode_row(event)}, popup_ttl=30.0)
    states = {r["state"] for r in await db.fetch("SELECT state FROM retailcrm_outbox")}
    in_outbox = states == {"pending"}
    assert (config.active and config.enabled) == in_matrix == in_outbox


def test_enabled_sql_takes_column_references_only() -> None:
    assert "e.integrations_config -> 'retailcrm'" in enabled_sql(
        "e.active", "e.integrations_config -> 'retailcrm'"
    )
    for bad in ("e.active; DROP TABLE enterprises", "x -> 'a' OR true", "'1'"):
        with pytest.raises(ValueError, match="column reference"):
            enabled_sql(bad, "c.value")
