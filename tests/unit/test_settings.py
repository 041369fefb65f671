"""Settings from the environment: defaults, validation, masked secrets, the dev JWT secret."""

from __future__ import annotations

import logging
import pickle
import stat
from pathlib import Path

import pytest

from retailcrm_service.security.secrets import Secret, mask
from retailcrm_service.settings import Settings

BASE = {"DATABASE_URL": "postgresql://u:pw@127.0.0.1:5432/db", "RETAILCRM_JWT_SECRET": "j" * 32}


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    s = Settings.from_env({**BASE, "RETAILCRM_DATA_DIR": str(tmp_path)})
    assert (s.host, s.port) == ("127.0.0.1", 8019)
    assert s.public_base_url == "http://127.0.0.1:8019"
    assert s.secret_key is None
    assert s.internal_token is None
    assert s.allow_http is False
    assert s.log_retention_days == 30
    assert s.module_code == "vochi-telephony"
    assert s.dialplan_rps == 20.0


def test_every_variable_is_read(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            **BASE,
            "RETAILCRM_HOST": "0.0.0.0",
            "RETAILCRM_PORT": "9000",
            "RETAILCRM_SECRET_KEY": "k" * 40,
            "RETAILCRM_PUBLIC_URL": "https://bot.example.by/",
            "RETAILCRM_INTERNAL_TOKEN": "t" * 24,
            "RETAILCRM_ALLOW_HTTP": "1",
            "RETAILCRM_DATA_DIR": str(tmp_path),
            "RETAILCRM_LOG_RETENTION_DAYS": "7",
            "RETAILCRM_API_TIMEOUT": "2.5",
            "RETAILCRM_DIALPLAN_RPS": "5",
        }
    )
    assert (s.host, s.port, s.allow_http, s.log_retention_days) == ("0.0.0.0", 9000, True, 7)
    assert s.public_base_url == "https://bot.example.by"
    assert s.secret_key is not None
    assert s.secret_key.get_secret_value() == "k" * 40
    assert s.internal_token is not None
    assert s.retailcrm_timeout == 2.5
    assert s.dialplan_rps == 5.0
    assert s.data_dir == tmp_path


def test_delivery_defaults_and_a_short_poll_interval(tmp_path: Path) -> None:
    s = Settings.from_env({**BASE, "RETAILCRM_DATA_DIR": str(tmp_path)})
    delivery = s.pipeline.delivery
    assert (delivery.poll_interval, delivery.claim_gap, delivery.breaker.open_max) == (
        0.5,
        0.01,
        15.0,
    )
    # A poll shorter than the claim gap shortens the gap instead of refusing to start.
    fast = Settings.from_env(
        {**BASE, "RETAILCRM_DATA_DIR": str(tmp_path), "RETAILCRM_DELIVERY_POLL_INTERVAL": "0.01"}
    )
    assert fast.pipeline.delivery.claim_gap == 0.005
    assert s.pipeline.outbox.history_gather == 0.5
    at_once = Settings.from_env(
        {**BASE, "RETAILCRM_DATA_DIR": str(tmp_path), "RETAILCRM_OUTBOX_HISTORY_GATHER": "0"}
    )
    assert at_once.pipeline.outbox.history_gather == 0.0
    assert s.pipeline.delivery.popup_concurrency == 4
    one = Settings.from_env(
        {**BASE, "RETAILCRM_DATA_DIR": str(tmp_path), "RETAILCRM_DELIVERY_POPUP_CONCURRENCY": "1"}
    )
    assert one.pipeline.delivery.popup_concurrency == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RETAILCRM_PORT", "70000"),
        ("RETAILCRM_PORT", "abc"),
        ("RETAILCRM_ALLOW_HTTP", "maybe"),
        ("RETAILCRM_PUBLIC_URL", "ftp://x"),
        ("RETAILCRM_PUBLIC_URL", "https://x/?token=1"),
        ("RETAILCRM_JWT_SECRET", "short"),
        ("RETAILCRM_LOG_RETENTION_DAYS", "-1"),
        ("RETAILCRM_DIALPLAN_RPS", "0"),
        ("RETAILCRM_DIALPLAN_RPS", "inf"),
        ("RETAILCRM_OUTBOX_HISTORY_GATHER", "-0.5"),
        ("RETAILCRM_OUTBOX_HISTORY_GATHER", "61"),
        ("RETAILCRM_OUTBOX_HISTORY_GATHER", "soon"),
        ("RETAILCRM_DELIVERY_POPUP_CONCURRENCY", "0"),
        ("RETAILCRM_DELIVERY_POPUP_CONCURRENCY", "2.5"),
    ],
)
def test_invalid_values_are_refused(name: str, value: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        Settings.from_env({**BASE, "RETAILCRM_DATA_DIR": str(tmp_path), name: value})


@pytest.mark.parametrize("value", ["0", "70000", "abc", "8019"])
def test_a_bad_public_port_is_refused_naming_its_variable(value: str, tmp_path: Path) -> None:
    env = {**BASE, "RETAILCRM_DATA_DIR": str(tmp_path), "RETAILCRM_PUBLIC_PORT": value}
    with pytest.raises(ValueError, match="RETAILCRM_PUBLIC_PORT"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "RETAILCRM_PUBLIC_PORT": "8020"}).public_port == 8020
    assert Settings.from_env({**BASE, "RETAILCRM_DATA_DIR": str(tmp_path)}).public_port is None


def test_secrets_are_masked_in_repr_and_str(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            **BASE,
            "RETAILCRM_SECRET_KEY": "supersecretvalue-1234",
            "RETAILCRM_DATA_DIR": str(tmp_path),
        }
    )
    text = repr(s) + str(s)
    assert "supersecretvalue" not in text
    assert "j" * 32 not in text
    assert "pw@" not in text
    assert "***1234" in text


def test_mask_shows_at_most_the_last_four_chars_of_long_values() -> None:
    assert mask("abcdefghijklmnopqrst") == "***qrst"
    assert mask("short") == "***"
    assert str(Secret("abc")) == "***"
    assert Secret("x" * 20) == Secret("x" * 20)
    with pytest.raises(TypeError):
        pickle.dumps(Secret("x"))


def test_without_a_jwt_secret_one_is_generated_persisted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"DATABASE_URL": BASE["DATABASE_URL"], "RETAILCRM_DATA_DIR": str(tmp_path)}
    with caplog.at_level(logging.INFO, logger="retailcrm_service.settings"):
        first = Settings.from_env(env)
        second = Settings.from_env(env)
    assert first.jwt_secret == second.jwt_secret
    assert len(first.jwt_secret.get_secret_value()) >= 32
    path = tmp_path / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any("settings.jwt_secret_generated" in r.getMessage() for r in caplog.records)
    assert all(first.jwt_secret.get_secret_value() not in r.getMessage() for r in caplog.records)
