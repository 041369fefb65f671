"""``retailcrm-service serve`` takes its address from the environment, a flag overrides it, and a
bad setting stops start-up with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import tempfile

import httpx
import pytest

from tests.support.procs import REPO_ROOT, ServiceProcess, _command, free_port

pytestmark = pytest.mark.slow

_JWT = "e2e-jwt-secret-0123456789abcdef-0123456789abcdef"


def _env(database_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": database_url,
        "RETAILCRM_JWT_SECRET": _JWT,
        "RETAILCRM_DATA_DIR": tempfile.mkdtemp(prefix="vochi-serve-"),
        **extra,
    }


def _serving(argv: list[str], port: int, env: dict[str, str]) -> ServiceProcess:
    return ServiceProcess(argv, port=port, ready_path="/health", env=env, name="serve")


def test_retailcrm_port_sets_the_listening_port(database_url: str) -> None:
    port = free_port()
    env = _env(database_url, RETAILCRM_PORT=str(port))
    with _serving([_command("retailcrm-service"), "serve"], port, env) as proc:
        assert httpx.get(f"{proc.url}/health", timeout=5).status_code == 200


def test_port_flag_overrides_retailcrm_port(database_url: str) -> None:
    env_port, flag_port = free_port(), free_port()
    env = _env(database_url, RETAILCRM_PORT=str(env_port))
    argv = [_command("retailcrm-service"), "serve", "--port", str(flag_port)]
    with _serving(argv, flag_port, env) as proc:
        assert httpx.get(f"{proc.url}/health", timeout=5).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{env_port}/health", timeout=2)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RETAILCRM_PORT", "eighty"),
        ("RETAILCRM_PORT", "70000"),
        ("RETAILCRM_ALLOW_HTTP", "maybe"),
        ("RETAILCRM_API_TIMEOUT", "inf"),
        ("RETAILCRM_JWT_SECRET", "short"),
        ("RETAILCRM_PUBLIC_URL", "ftp://example.org"),
        ("RETAILCRM_OUTBOX_POPUP_TTL", "-1"),
        ("RETAILCRM_PACING_TELEPHONY_RPS", "fast"),
        ("RETAILCRM_SSH_PORT", "0"),
        ("RETAILCRM_SSH_USER", "root; id"),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(
    database_url: str, variable: str, value: str
) -> None:
    env = _env(database_url, **{variable: value})
    done = subprocess.run(
        [_command("retailcrm-service"), "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]
    assert "Traceback" not in done.stderr
