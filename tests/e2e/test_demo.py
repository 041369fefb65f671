"""``retailcrm-service demo``: the quick start's first command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import free_port

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_demo_runs_the_whole_system_and_shows_a_call_reaching_the_sandbox(tmp_path: Path) -> None:
    """The demo starts every part, prints the matrix, and its call reaches RetailCRM's history."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["RETAILCRM_DATA_DIR"] = str(tmp_path / "data")
    ports = [str(free_port()) for _ in range(3)]
    result = subprocess.run(
        [
            str(BIN / "retailcrm-service"),
            "demo",
            "--no-wait",
            "--sandbox-port",
            ports[0],
            "--service-port",
            ports[1],
            "--call-service-port",
            ports[2],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "0367  Демо: Интернет-магазин       retailcrm" in out
    assert "0368  Демо: Турагентство           uon" in out
    assert "RetailCRM popups shown to users: 1, 2, 3" in out
    assert "call history: result=answered" in out
    assert f"http://127.0.0.1:{ports[1]}/retailcrm-admin/login?token=" in out
    assert "Demo ready." in out
    assert "(API key ***" in out
    # The sandbox's API key is shown masked only, and pgserver's chatter stays out of the way.
    assert "initdb" not in result.stderr
