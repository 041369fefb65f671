"""Vochi CRM client: the enablement matrix and event dispatch for the platform's call services."""

from ._backoff import BackoffPolicy, ceiling, delay
from ._exceptions import LoadError, LoadTimeout, StateError, VochiCrmError

__all__ = [
    "BackoffPolicy",
    "LoadError",
    "LoadTimeout",
    "StateError",
    "VochiCrmError",
    "ceiling",
    "delay",
]
