"""The library's exception tree; nothing from asyncpg or httpx leaks out of it.

::

    VochiCrmError                  base of every error the library raises on purpose
     ├── StateError                an object used before ``async with`` or after closing
     │                             (also a ``RuntimeError``)
     └── LoadError                 a cache loader failed; nothing was cached; ``__cause__`` holds
          │                        the original error (asyncpg, OSError, ...)
          └── LoadTimeout          a cache loader took longer than its ``load_timeout``

Foreign errors are translated where they enter the library (``raise LoadError(...) from exc``).
Cancellation (``asyncio.CancelledError``) is never translated and never swallowed.
"""

from __future__ import annotations

__all__ = ["LoadError", "LoadTimeout", "StateError", "VochiCrmError"]


class VochiCrmError(Exception):
    """Base class of every error the library raises on purpose."""


class StateError(VochiCrmError, RuntimeError):
    """The object is not open (used before ``async with`` or after it closed)."""


class LoadError(VochiCrmError):
    """A cache loader failed; the cache kept its previous value and cached nothing new."""


class LoadTimeout(LoadError):
    """A cache loader did not finish within its ``load_timeout``."""
