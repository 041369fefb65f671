"""One enterprise's diagnostics for its admin («Диагностика»).

``enterprise_diagnostics(...)`` gathers, for one enterprise only: its entry in the config cache
and the cache's own state, the ``LISTEN`` connection's state, its delivery breaker, the pacing
state of its API key (named by the masked key, never the key), its outbox backlog and oldest due
event, the last successes and errors of its journal and the result of its last connection test.
Nothing of another enterprise and no secret is in the answer.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from retailcrm_service.crm.pacing import Pacer, key_id
from retailcrm_service.pipeline.intake import EventPipeline
from retailcrm_service.storage import history
from retailcrm_service.storage.enterprise_configs import ConfigCache
from vochi_crm_client import ChangeListener

_CACHE_FIELDS = ("state", "size", "loads", "load_errors", "full_reloads", "snapshot_age")
_LISTENER_FIELDS = ("state", "heartbeat_age", "reconnects", "notifications")


async def enterprise_diagnostics(
    number: str,
    *,
    pool: asyncpg.Pool,
    configs: ConfigCache,
    listener: ChangeListener | None,
    events: EventPipeline | None,
    pacer: Pacer,
) -> dict[str, Any]:
    cached = configs.peek(number)
    cache_stats = configs.stats()
    listener_stats = listener.stats() if listener is not None else {"state": "not running"}
    pacing: dict[str, Any] | None = None
    if cached is not None and cached.api_key is not None:
        state = pacer.stats().get(key_id(cached.api_key.get_secret_value()))
        pacing = {"api_key": cached.api_key.masked, **(state or {"rate_fraction": 1.0})}
    delivery = events.stats() if events is not None else {}
    breaker = (delivery.get("breakers") or {}).get(number, "closed")
    counters = (delivery.get("enterprises") or {}).get(number)
    return {
        "enterprise_number": number,
        "config_cache": {
            "cached": cached is not None,
            "is_on": cached.is_on if cached is not None else False,
            **{k: cache_stats.get(k) for k in _CACHE_FIELDS if k in cache_stats},
        },
        "listener": {k: listener_stats.get(k) for k in _LISTENER_FIELDS if k in listener_stats},
        "delivery": {
            "running": events is not None,
            "breaker": breaker,
            "counters": counters,
        },
        "pacing": pacing,
        "outbox": await history.backlog(pool, number),
        **await history.last_outcomes(pool, number),
    }
