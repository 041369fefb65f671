"""Secrets as values: ``Secret`` masks itself in ``repr``/``str``; ``mask`` is the one masking rule.

Every place that shows part of a secret (settings, journal rows, admin pages, logs) uses ``mask``,
which is the library's ``mask_token`` (one rule for the whole system): ``***`` plus the last 4
characters, and only when the value is long enough (16+) that 4 characters reveal little; shorter
values are ``***`` alone.
"""

from __future__ import annotations

import secrets
from typing import Any

from vochi_crm_client import mask_token


class Secret:
    """A secret string: masked in ``repr``/``str``, compared in constant time."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    @property
    def masked(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret('{self.masked}')"

    def __str__(self) -> str:
        return self.masked

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return secrets.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:  # pickling would be a way to leak it
        raise TypeError("Secret cannot be pickled")


def mask(value: str) -> str:
    """``***`` plus the last 4 chars, only when the value is long enough to stay mostly hidden."""
    return mask_token(value)
