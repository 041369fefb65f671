"""The benchmarks stay runnable: each runs in --quick mode from the venv, outside the checkout,
and ends with its JSON line. Their figures are not asserted (the machine is shared and noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))


def test_every_benchmark_is_found() -> None:
    assert {b.stem for b in BENCHMARKS} >= {
        "dispatch_throughput",
        "ingest",
        "matrix_hot_path",
        "smart_redirect",
    }


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_quick_run_ends_with_its_figures_as_json(script: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=tmp_path,  # not the checkout: the installed packages must suffice
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == script.stem
