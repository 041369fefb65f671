"""Vochi CRM client: the enablement matrix and event dispatch for the platform's call services."""

from ._backoff import BackoffPolicy, SupportsRandom, ceiling, delay, parse_retry_after
from ._breaker import Breaker, BreakerState, Permit
from ._cache import (
    CACHE_STATS_KEYS,
    NOT_LOADED,
    CacheSettings,
    CacheState,
    Lookup,
    LookupStatus,
    NotLoaded,
    RefreshingCache,
)
from ._client import ClientState, CrmClient
from ._config import BreakerConfig, DispatchConfig
from ._event import (
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    CallEvent,
    EventFields,
    idempotency_key,
    validate_event,
)
from ._exceptions import LoadError, LoadTimeout, StateError, VochiCrmError
from ._listener import (
    LISTENER_STATS_KEYS,
    Change,
    ChangeListener,
    ListenerSettings,
    ListenerState,
    parse_change,
)
from ._matrix import (
    EnablementMatrix,
    MatrixState,
    enabled_sql,
    enterprise_for_token,
    mask_token,
)
from ._tasks import BackgroundTasks, log_unexpected

__all__ = [
    "CACHE_STATS_KEYS",
    "EVENT_TYPES",
    "LISTENER_STATS_KEYS",
    "MAX_EVENT_BYTES",
    "NOT_LOADED",
    "BackgroundTasks",
    "BackoffPolicy",
    "Breaker",
    "BreakerConfig",
    "BreakerState",
    "CacheSettings",
    "CacheState",
    "CallEvent",
    "Change",
    "ChangeListener",
    "ClientState",
    "CrmClient",
    "DispatchConfig",
    "EnablementMatrix",
    "EventFields",
    "ListenerSettings",
    "ListenerState",
    "LoadError",
    "LoadTimeout",
    "Lookup",
    "LookupStatus",
    "MatrixState",
    "NotLoaded",
    "Permit",
    "RefreshingCache",
    "StateError",
    "SupportsRandom",
    "VochiCrmError",
    "ceiling",
    "delay",
    "enabled_sql",
    "enterprise_for_token",
    "idempotency_key",
    "log_unexpected",
    "mask_token",
    "parse_change",
    "parse_retry_after",
    "validate_event",
]
