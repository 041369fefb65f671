"""``retailcrm-service``: serve, migrate, sandbox, demo, token (README.md's commands).

Every option's help shows its default. ``--log-level`` and ``--log-format`` go before or after
the command. A bad command line is one line on stderr and exit status 2; a bad setting or a
database that cannot be reached is one line and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from retailcrm_service import __version__

PROG = "retailcrm-service"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")


def _cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from retailcrm_service.app import serve
    from retailcrm_service.settings import Settings

    # Flag over environment over default: the flags default to None, meaning "not given".
    settings = Settings.from_env()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    serve(settings)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from retailcrm_service.settings import data_dir_from, database_url_from
    from retailcrm_service.storage.database import database_url, migrate

    env = dict(os.environ)
    applied = asyncio.run(migrate(database_url(database_url_from(env), data_dir_from(env))))
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from retailcrm_service.sandbox import serve

    serve(host=args.host, port=args.port, api_keys=args.api_key, rate_limit=not args.no_rate_limit)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from retailcrm_service.ops.demo import DemoPorts, run

    ports = DemoPorts(
        sandbox=args.sandbox_port, service=args.service_port, call_service=args.call_service_port
    )
    return run(ports=ports, wait=not args.no_wait)


def _cmd_token(args: argparse.Namespace) -> int:
    from retailcrm_service.security.admin_auth import admin_link_command

    print(admin_link_command(args.enterprise_number, ttl_seconds=args.ttl))
    return 0


def port_number(raw: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {raw!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (and no usage block above it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common_options(*, top: bool) -> OneLineErrorParser:
    """``--log-level`` and ``--log-format``; after the command they default to "not given", so
    a value given before the command is not overwritten."""
    parent = OneLineErrorParser(add_help=False)
    group = parent.add_argument_group("common options (before or after the command)")
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default="INFO" if top else argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"log level: {', '.join(LEVELS)} (default: INFO)",
    )
    group.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None if top else argparse.SUPPRESS,
        help="log lines as key=value text or JSON (default: RETAILCRM_LOG_FORMAT or text)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=PROG,
        description="The RetailCRM integration service of the Vochi PBX.",
        parents=[_common_options(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common_options(top=False)]

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text + ".", parents=common)

    serve = command("serve", "run the HTTP service (applies pending migrations first)")
    serve.add_argument(
        "--host", default=None, help="address to listen on (default: RETAILCRM_HOST or 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=port_number, default=None, help="port (default: RETAILCRM_PORT or 8019)"
    )
    serve.set_defaults(func=_cmd_serve)

    migrate = command("migrate", "apply pending database migrations (DATABASE_URL)")
    migrate.set_defaults(func=_cmd_migrate)

    sandbox = command("sandbox", "run the RetailCRM API v5 emulator")
    sandbox.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    sandbox.add_argument("--port", type=port_number, default=8090, help="port (default: 8090)")
    sandbox.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="add an account with this key and full telephony access (repeatable; default: none)",
    )
    sandbox.add_argument(
        "--no-rate-limit",
        action="store_true",
        help="disable RetailCRM's rate limits (default: enforced)",
    )
    sandbox.set_defaults(func=_cmd_sandbox)

    demo = command("demo", "run the whole system locally with the sandbox")
    demo.add_argument(
        "--sandbox-port", type=port_number, default=8090, help="sandbox port (default: 8090)"
    )
    demo.add_argument(
        "--service-port", type=port_number, default=8019, help="service port (default: 8019)"
    )
    demo.add_argument(
        "--call-service-port",
        type=port_number,
        default=8000,
        help="call service port (default: 8000)",
    )
    demo.add_argument(
        "--no-wait",
        action="store_true",
        help="stop everything once the demo call is shown (default: wait for Ctrl-C)",
    )
    demo.set_defaults(func=_cmd_demo)

    token = command("token", "print a short-lived one-time admin login link for an enterprise")
    token.add_argument("enterprise_number", help="the enterprise's number, e.g. 0367")
    token.add_argument(
        "--ttl", type=_positive_int, default=3600, help="lifetime in seconds (default: 3600)"
    )
    token.set_defaults(func=_cmd_token)
    return parser


def _database_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        ConnectionError,
        socket.gaierror,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    )


def _fail(message: str) -> int:
    from retailcrm_service.ops.logs import redact

    print(f"{PROG}: {redact(message)}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from retailcrm_service.ops import logs
    from retailcrm_service.settings import SettingsError, log_format_from

    try:
        logs.configure(args.log_level, args.log_format or log_format_from(os.environ))
        return int(args.func(args) or 0)
    except SettingsError as exc:
        return _fail(str(exc))
    except _database_errors() as exc:
        detail = str(exc).strip() or type(exc).__name__
        return _fail(f"the database is unavailable: {type(exc).__name__}: {detail}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
