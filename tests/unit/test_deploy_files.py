"""deploy/: the example environment lists every setting, and the systemd units restart and
harden the processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = ("retailcrm-service@.service", "vochi-call-service.service")


def _settings_variables() -> set[str]:
    source = (REPO / "retailcrm_service" / "settings.py").read_text()
    return set(re.findall(r'"((?:RETAILCRM_[A-Z_]+[A-Z])|DATABASE_URL)"', source))


def test_the_example_environment_and_the_readme_list_every_setting() -> None:
    example = (DEPLOY / "retailcrm.env.example").read_text()
    readme = (REPO / "README.md").read_text()
    variables = _settings_variables()
    assert "RETAILCRM_LOG_FORMAT" in variables
    for variable in variables:
        assert re.search(rf"^#?{variable}=", example, re.M), variable
        assert f"`{variable}`" in readme, variable


@pytest.mark.parametrize("unit", UNITS)
def test_units_restart_the_process_and_harden_it(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert keys["Restart"] == "always"
    assert "EnvironmentFile=/etc/vochi/retailcrm.env" in text
    if unit.endswith("@.service"):  # each instance's public port
        assert "EnvironmentFile=-/etc/vochi/retailcrm-%i.env" in text
    assert keys["User"] != "root"
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert keys[option] == "yes", option
    assert keys["ProtectSystem"] == "strict"
    assert keys["CapabilityBoundingSet"] == ""


def test_the_service_unit_is_a_template_one_instance_per_port() -> None:
    text = (DEPLOY / "systemd" / "retailcrm-service@.service").read_text()
    assert re.search(r"^ExecStart=\S+/retailcrm-service serve .*--port %i$", text, re.M)
