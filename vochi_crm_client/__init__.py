"""Vochi CRM client: the enablement matrix and event dispatch for the platform's call services."""

from ._backoff import BackoffPolicy, SupportsRandom, ceiling, delay
from ._breaker import BreakerState
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
from ._event import EVENT_TYPES, CallEvent, idempotency_key
from ._exceptions import LoadError, LoadTimeout, StateError, VochiCrmError
from ._listener import (
    LISTENER_STATS_KEYS,
    Change,
    ChangeListener,
    ListenerSettings,
    ListenerState,
    parse_change,
)
from ._matrix import EnablementMatrix, MatrixState, mask_token

__all__ = [
    "CACHE_STATS_KEYS",
    "EVENT_TYPES",
    "LISTENER_STATS_KEYS",
    "NOT_LOADED",
    "BackoffPolicy",
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
    "ListenerSettings",
    "ListenerState",
    "LoadError",
    "LoadTimeout",
    "Lookup",
    "LookupStatus",
    "MatrixState",
    "NotLoaded",
    "RefreshingCache",
    "StateError",
    "SupportsRandom",
    "VochiCrmError",
    "ceiling",
    "delay",
    "idempotency_key",
    "mask_token",
    "parse_change",
]
