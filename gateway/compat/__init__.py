"""The old clients' API (`/api/unified/*`), unchanged on the wire, safe underneath.

Every route here renders errors in the seeds' shape (`CompatRoute`); the
endpoints call the services' native APIs like any other client. Modules:
`unified.py` (credits and users); the workspace endpoints come with the
workspace service (`workspace.py`). Modules in `OWN_ROUTERS` serve routes outside
`/api/unified` and bring their own `router` (`enhance.py`: seed 004's routes).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from gateway.compat.errors import ERRORS, compat_response, from_validation
from services.kit.errors import KuError, http_error

MODULES = ("unified", "workspace", "crossapp")
OWN_ROUTERS = ("enhance",)


class CompatRoute(APIRoute):
    """Renders any `KuError` (and invalid input) as `{"success": false, "error": ...}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except KuError as exc:
                return compat_response(exc)
            except RequestValidationError as exc:
                return compat_response(from_validation(exc))
            except HTTPException as exc:  # e.g. a body FastAPI cannot parse
                return compat_response(http_error(exc))

        return route


def build_router() -> APIRouter:
    router = APIRouter(
        prefix="/api/unified", route_class=CompatRoute, tags=["compatibility"], responses=ERRORS
    )
    for name in MODULES:
        try:
            module = importlib.import_module(f"gateway.compat.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gateway.compat.{name}":
                raise
            continue
        module.register(router)
    root = APIRouter()
    root.include_router(router)
    for name in OWN_ROUTERS:
        root.include_router(importlib.import_module(f"gateway.compat.{name}").router)
    return root
