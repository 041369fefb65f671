"""The public surface of vochi_crm_client is pinned: changing it is a deliberate act."""

from __future__ import annotations

import ast
from pathlib import Path

import vochi_crm_client

PUBLIC = [
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


def test_all_is_exactly_the_pinned_public_names() -> None:
    assert vochi_crm_client.__all__ == PUBLIC


def test_all_is_sorted_constants_then_classes_then_functions() -> None:
    def group(name: str) -> int:
        if name.isupper():
            return 0
        return 1 if name[0].isupper() else 2

    assert sorted(PUBLIC, key=lambda n: (group(n), n)) == PUBLIC


def test_every_public_name_exists() -> None:
    for name in vochi_crm_client.__all__:
        assert getattr(vochi_crm_client, name) is not None, name


def test_public_classes_claim_the_public_module_or_a_private_one() -> None:
    for name in ("CrmClient", "CallEvent", "EnablementMatrix"):
        module = getattr(vochi_crm_client, name).__module__
        assert module.startswith("vochi_crm_client."), module


def test_the_library_imports_nothing_from_the_service_or_the_adapters() -> None:
    package = Path(vochi_crm_client.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root not in {"retailcrm_service", "adapters"}, (source.name, name)
