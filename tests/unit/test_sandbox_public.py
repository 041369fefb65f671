"""The sandbox's public names, pinned: other issues' tests and the demo import them."""

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
