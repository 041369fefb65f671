"""``retailcrm-service``: serve, migrate, sandbox, demo, token (ARCHITECTURE.md §5)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence


def _cmd_serve(args: argparse.Namespace) -> int:
    from retailcrm_service.app import serve

    serve(host=args.host, port=args.port)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from retailcrm_service.db import database_url, migrate

    applied = asyncio.run(migrate(database_url()))
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from retailcrm_service.sandbox import serve

    serve(host=args.host, port=args.port, api_keys=args.api_key, rate_limit=not args.no_rate_limit)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from retailcrm_service.demo import DemoPorts, run

    ports = DemoPorts(
        sandbox=args.sandbox_port, service=args.service_port, call_service=args.call_service_port
    )
    return run(ports=ports, wait=not args.no_wait)


def _cmd_token(args: argparse.Namespace) -> int:
    from retailcrm_service.auth import admin_link_command

    print(admin_link_command(args.enterprise_number, ttl_seconds=args.ttl))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retailcrm-service", description="The RetailCRM integration service of the Vochi PBX."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8019)
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
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
