"""HTTP routes, one module per area: parse, authorise, call one component, shape the reply."""

from __future__ import annotations

from fastapi import FastAPI


def include_routers(app: FastAPI) -> None:
    """Every area's router, in the order their routes are matched."""
    from retailcrm_service.api import (
        admin,
        admin_pages,
        callbacks,
        config,
        events,
        openapi,
        ops,
        smart_redirect,
    )

    # The routes themselves go into the app's router, not include_router()'s wrapper: since
    # FastAPI 0.137 an included router is matched lazily, route by route through per-request
    # context bookkeeping, which cost about 1.4 ms per request here before any handler ran
    # (benchmarks/smart_redirect.py: /health p50 4.7 ms). Equivalent for these routers: none
    # is included with a prefix, tags or dependencies of its own, and a router's dependencies
    # and tags are already part of each route it made. The hot routes come first.
    for module in (events, smart_redirect, callbacks, ops, openapi, config, admin, admin_pages):
        app.router.routes.extend(module.router.routes)
