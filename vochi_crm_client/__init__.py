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

__all__ = [
    "CACHE_STATS_KEYS",
    "NOT_LOADED",
    "BackoffPolicy",
    "CacheSettings",
    "CacheState",
    "LoadError",
    "LoadTimeout",
    "Lookup",
    "LookupStatus",
    "NotLoaded",
    "RefreshingCache",
    "StateError",
    "SupportsRandom",
    "VochiCrmError",
    "ceiling",
    "delay",
]
