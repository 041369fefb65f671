"""The sandbox's public names, pinned: the service's tests and the demo import them."""

from __future__ import annotations

import inspect

import pytest

import retailcrm_service.sandbox as sandbox


def test_public_names_are_pinned() -> None:
    assert sandbox.__all__ == [
        "SCOPES",
        "ApiError",
        "AsyncSandboxControl",
        "AsyncSandboxServer",
        "ControlError",
        "Sandbox",
        "SandboxConfig",
        "SandboxControl",
        "SandboxError",
        "SandboxServer",
        "cli_accounts",
        "create_sandbox_app",
        "mask",
        "serve",
    ]


def test_serve_takes_the_cli_keywords() -> None:
    """retailcrm_service/cli.py calls serve(host=, port=, api_keys=, rate_limit=)."""
    params = inspect.signature(sandbox.serve).parameters
    assert list(params) == ["host", "port", "api_keys", "rate_limit"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_config_rejects_nonsense() -> None:
    for bad in (
        {"general_rps": 0},
        {"rate_window_seconds": 0},
        {"max_calls_per_upload": 0},
        {"no_manager_shape": "empty"},
        {"missing_key_status": 200},
    ):
        with pytest.raises(ValueError, match=r"."):
            sandbox.SandboxConfig(**bad)  # type: ignore[arg-type]


def test_reprs_never_show_an_api_key() -> None:
    from retailcrm_service.sandbox._core import Incoming
    from retailcrm_service.sandbox._state import Account, ApiKey, Module

    key = "repr-key-0123456789abcdef"
    api_key = ApiKey(key=key, scopes=frozenset({"user_read"}))
    account = Account(name="a", keys={key: api_key})
    module = Module(code="m", data={}, owner_key=key)
    incoming = Incoming(
        method="GET",
        path="/api/v5/users",
        query=[("apiKey", key)],
        form=[],
        header_key=key,
        base_url="http://x",
    )
    for obj in (api_key, account, module, incoming):
        assert key not in repr(obj)
    assert "***cdef" in repr(api_key)
