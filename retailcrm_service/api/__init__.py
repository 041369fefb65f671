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

    for module in (ops, openapi, config, admin, admin_pages, events, smart_redirect, callbacks):
        app.include_router(module.router)
