"""The ``retailcrm-service`` command line, run as a real process: help with defaults, --version,
common options on either side of the command, and one-line errors with the documented status."""

from __future__ import annotations

import os
import subprocess

import pytest

from retailcrm_service import __version__
from retailcrm_service.cli import build_parser
from tests.support.procs import REPO_ROOT, _command

COMMANDS = ("serve", "migrate", "sandbox", "demo", "token")
_JWT = "cli-jwt-secret-0123456789abcdef-0123456789abcdef"


def _run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RETAILCRM_JWT_SECRET": _JWT, **env}
    return subprocess.run(
        [_command("retailcrm-service"), *argv],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _options(parser: object) -> list[str]:
    """Every option string of a parser but -h/--help and --version."""
    return [
        option
        for action in parser._actions  # type: ignore[attr-defined]
        for option in action.option_strings
        if option not in ("-h", "--help", "--version")
    ]


def test_help_of_the_program_and_every_command_shows_every_option_with_its_default() -> None:
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subparsers) == set(COMMANDS)
    for argv, sub in [((), parser)] + [((c,), subparsers[c]) for c in COMMANDS]:
        result = _run(*argv, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        for option in _options(sub):
            assert option in text, (argv, option)
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                assert "default" in (action.help or ""), (argv, action.dest)
    serve_help = " ".join(_run("serve", "--help").stdout.split())
    assert "(default: RETAILCRM_PORT or 8019)" in serve_help
    assert "(default: INFO)" in serve_help


def test_version_prints_the_package_version() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"retailcrm-service {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ("--log-level", "foo", "migrate"),
        ("migrate", "--log-level", "foo"),
        ("serve", "--port", "eighty"),
        ("token", "0367", "--ttl", "0"),
        ("frobnicate",),
        (),
    ],
)
def test_an_invalid_command_line_is_one_line_and_exit_status_2(argv: tuple[str, ...]) -> None:
    result = _run(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("retailcrm-service")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [("migrate",), ("token", "0367"), ("serve", "--port", "18019")])
def test_an_unreachable_database_is_one_line_and_exit_status_1(argv: tuple[str, ...]) -> None:
    result = _run(*argv, DATABASE_URL="postgresql://vochi:hunter2-secret@127.0.0.1:1/vochi")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the database is unavailable" in lines[0]
    assert "hunter2-secret" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"), [("RETAILCRM_LOG_FORMAT", "xml"), ("RETAILCRM_PORT", "eighty")]
)
def test_a_bad_setting_is_one_line_naming_it_and_exit_status_1(variable: str, value: str) -> None:
    result = _run("serve", **{variable: value, "DATABASE_URL": "postgresql://127.0.0.1:1/x"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]


def test_log_options_work_before_and_after_the_command() -> None:
    env = {"DATABASE_URL": "postgresql://127.0.0.1:1/x"}
    before = _run("--log-level", "debug", "--log-format", "json", "migrate", **env)
    after = _run("migrate", "--log-level", "debug", "--log-format", "json", **env)
    for result in (before, after):
        assert result.returncode == 1  # got past the parser to the database
        assert "the database is unavailable" in result.stderr
    args = build_parser().parse_args(["--log-level", "debug", "migrate"])
    assert args.log_level == "DEBUG"
    args = build_parser().parse_args(["migrate", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("INFO", "json")


@pytest.mark.parametrize("argv", [("--port", "x"), ("--log-level", "foo"), ("--target", "bad")])
def test_the_call_service_refuses_a_bad_command_line_in_one_line(argv: tuple[str, ...]) -> None:
    result = subprocess.run(
        [_command("vochi-call-service"), *argv],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": "postgresql://h:1/x"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vochi-call-service")
