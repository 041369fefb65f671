"""``retailcrm-service``: serve, migrate, sandbox, demo, token (README.md's commands)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence


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


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {raw!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retailcrm-service", description="The RetailCRM integration service of the Vochi PBX."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument(
        "--host", default=None, help="address to listen on (default: RETAILCRM_HOST or 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=_port, default=None, help="port (default: RETAILCRM_PORT or 8019)"
    )
    serve.set_defaults(func=_cmd_serve)

    migrate = sub.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(func=_cmd_migrate)

    sandbox = sub.add_parser("sandbox", help="run the RetailCRM API v5 emulator")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="add an account with this key and full telephony access (repeatable)",
    )
    sandbox.add_argument("--no-rate-limit", action="store_true", help="disable the rate limits")
    sandbox.set_defaults(func=_cmd_sandbox)

    demo = sub.add_parser("demo", help="run the whole system locally with the sandbox")
    demo.add_argument("--sandbox-port", type=int, default=8090)
    demo.add_argument("--service-port", type=int, default=8019)
    demo.add_argument("--call-service-port", type=int, default=8000)
    demo.add_argument(
        "--no-wait", action="store_true", help="stop everything once the demo call is shown"
    )
    demo.set_defaults(func=_cmd_demo)

    token = sub.add_parser("token", help="print a short-lived admin link for an enterprise")
    token.add_argument("enterprise_number")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.set_defaults(func=_cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # Chatty third-party loggers: pgserver echoes initdb's output, httpx logs every request.
    for name in ("pgserver", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    from retailcrm_service.settings import SettingsError

    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"retailcrm-service: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
