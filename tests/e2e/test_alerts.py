"""deploy/prometheus/alerts.yml passes ``promtool check rules`` and ``promtool test rules``, and
every alert has a promtool test in which it fires and one in which it stays quiet."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _promtool(*argv: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is not installed (apt-get install -y prometheus)")
    return subprocess.run(
        [PROMTOOL, *argv], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False
    )


def _alerts() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", (PROMETHEUS / "alerts.yml").read_text(), re.M)


def test_promtool_check_rules_accepts_the_alerts() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = (PROMETHEUS / "alerts_test.yml").read_text()
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", tests))
    alerts = set(_alerts())
    assert alerts == {
        "ConfigCacheHitRatioLow",
        "MatrixCacheHitRatioLow",
        "RetailCrmErrorRateHigh",
        "DeliveryBreakerOpen",
        "CallServiceTargetBreakerOpen",
        "OutboxBacklogOld",
        "OutboxDeadLetters",
        "ChangeListenerDisconnected",
        "PopupDeliveryLagHigh",
        "RetailCrmRateLimited",
    }
    assert alerts - firing == set()
    assert alerts - quiet == set()


def test_every_alert_links_its_runbook_entry_in_the_operations_guide() -> None:
    guide = (PROMETHEUS.parents[1] / "docs" / "operations.md").read_text().lower()
    for alert in _alerts():
        assert f"#{alert.lower()}" in (PROMETHEUS / "alerts.yml").read_text()
        assert f"### {alert.lower()}" in guide, alert
