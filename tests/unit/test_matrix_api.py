"""The matrix's public surface: notification payloads, settings, token masking (the exports are
pinned once, in test_public_api.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vochi_crm_client import (
    NOT_LOADED,
    BackoffPolicy,
    Change,
    EnablementMatrix,
    ListenerSettings,
    MatrixState,
    StateError,
    mask_token,
    parse_change,
)


def test_library_does_not_import_the_service_or_the_adapters() -> None:
    # A fresh interpreter: this test process has the service loaded already (via conftest).
    probe = (
        "import sys, vochi_crm_client, vochi_crm_client.testing; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('retailcrm_service', 'adapters')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            '{"enterprise_number": "0367", "integration_type": "retailcrm"}',
            Change("0367", "retailcrm"),
        ),
        ('{"enterprise_number": "0367", "integration_type": "*"}', Change("0367", "*")),
        ('{"enterprise_number": "0367"}', Change("0367", "*")),
        ('{"heartbeat": "abc", "sent_at": 1.5}', None),
        ('["0367"]', None),
        ('{"enterprise_number": 367}', None),
    ],
)
def test_parse_change_reads_changes_and_ignores_heartbeats(
    payload: str, expected: Change | None
) -> None:
    assert parse_change(payload) == expected


def test_parse_change_rejects_non_json() -> None:
    with pytest.raises(json.JSONDecodeError):
        parse_change("not json")


def test_heartbeat_payloads_are_never_changes() -> None:
    heartbeat = json.dumps({"heartbeat": "0a1b2c3d4e5f", "sent_at": 1764000000.0})
    assert parse_change(heartbeat) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channel": "bad channel; drop"},
        {"heartbeat_interval": 0},
        {"heartbeat_interval": 10, "heartbeat_timeout": 5},
        {"connect_timeout": float("nan")},
    ],
)
def test_invalid_listener_settings_are_rejected_when_built(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="ListenerSettings"):
        ListenerSettings(**kwargs)  # type: ignore[arg-type]


def test_listener_settings_defaults_match_production() -> None:
    settings = ListenerSettings()
    assert settings.channel == "integrations_changed"
    assert settings.heartbeat_timeout > settings.heartbeat_interval
    assert settings.reconnect == BackoffPolicy(base=0.5, cap=30.0)


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        ("0367", "***"),
        ("a" * 28 + "9f3e", "***9f3e"),
        ("token-0367", "***"),
        ("x" * 11 + "0367", "***"),
        ("x" * 12 + "0367", "***0367"),
        ("", "***"),
    ],
)
def test_tokens_are_masked_to_their_last_four_characters_only_from_16_on(
    token: str, shown: str
) -> None:
    assert mask_token(token) == shown


async def test_unopened_matrix_answers_not_loaded_and_refuses_loads() -> None:
    matrix = EnablementMatrix(dsn="postgresql://user:pw@127.0.0.1:1/none", listen=False)
    assert matrix.state is MatrixState.UNOPENED
    assert matrix.lookup("0367") is NOT_LOADED
    assert matrix.lookup_token("tok") is NOT_LOADED
    with pytest.raises(StateError):
        await matrix.integrations_for("0367")
    assert "pw" not in repr(matrix)
    assert json.loads(json.dumps(matrix.stats()))["listener"] is None
