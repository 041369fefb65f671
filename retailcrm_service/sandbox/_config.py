"""Frozen settings of the sandbox; every UNCONFIRMED server behaviour is a switch here."""

from __future__ import annotations

from dataclasses import dataclass, field

SCOPES = frozenset(
    {
        "integration_read",
        "integration_write",
        "telephony_read",
        "telephony_write",
        "user_read",
        "user_write",
        "customer_read",
        "order_read",
    }
)
"""Full telephony access: every scope a PBX integration needs (names after RetailCRM's)."""

NO_MANAGER_SHAPES = ("absent", "null", "404")


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Behaviour switches; defaults follow docs/retailcrm.md#sandbox."""

    rate_limit: bool = True
    general_rps: int = 10
    telephony_rps: int = 40
    rate_window_seconds: float = 1.0
    max_calls_per_upload: int = 50
    strict_booleans: bool = True
    """Only ``1``/``0`` for booleans in GET parameters; False also accepts ``true``/``True``."""
    manager_available_statuses: tuple[str, ...] = ("free",)
    """With ``ignoreStatus=0`` a responsible manager in another status is not returned."""
    no_manager_shape: str = "absent"
    """``absent``: no ``manager`` key; ``null``: ``"manager": null``; ``404``: 404 ``Not found``."""
    customer_name_matches_phone: bool = True
    """``filter[name]`` on customers also matches phone digits."""
    module_edit_replaces: bool = True
    """An edit replaces the stored module (False: merges top-level keys into it)."""
    missing_key_status: int = 401
    wrong_key_status: int = 403
    access_denied_status: int = 403
    telephony_disabled_status: int = 400
    request_log_size: int = 2000
    max_open_popups_per_user: int = 50
    """Beyond this the oldest open card of the user is marked ``expired``."""
    callback_timeout_seconds: float = 5.0
    fault_timeout_seconds: float = 30.0
    default_sites: tuple[str, ...] = field(default=("main",))

    def __post_init__(self) -> None:
        if self.general_rps < 1 or self.telephony_rps < 1:
            raise ValueError("rates must be at least 1 request per window")
        if self.rate_window_seconds <= 0:
            raise ValueError("rate_window_seconds must be positive")
        if self.max_calls_per_upload < 1:
            raise ValueError("max_calls_per_upload must be at least 1")
        if self.no_manager_shape not in NO_MANAGER_SHAPES:
            raise ValueError(f"no_manager_shape must be one of {NO_MANAGER_SHAPES}")
        if self.request_log_size < 1 or self.max_open_popups_per_user < 1:
            raise ValueError("request_log_size and max_open_popups_per_user must be positive")
        for status in (self.missing_key_status, self.wrong_key_status, self.access_denied_status):
            if not 400 <= status <= 499:
                raise ValueError("auth error statuses must be 4xx")
