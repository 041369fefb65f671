"""Vochi CRM client: the enablement matrix and event dispatch for the platform's call services."""

from ._backoff import BackoffPolicy, SupportsRandom, ceiling, delay
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
    "LISTENER_STATS_KEYS",
    "NOT_LOADED",
    "BackoffPolicy",
    "CacheSettings",
    "CacheState",
    "Change",
    "ChangeListener",
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
    "mask_token",
    "parse_change",
]
