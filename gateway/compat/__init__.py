"""The old clients' API (`/api/unified/*`), unchanged on the wire, safe underneath.

Every route here renders errors in the seeds' shape (`CompatRoute`); the
endpoints call the services' native APIs like any other client. Modules:
`unified.py` (credits and users); the workspace endpoints come with the
workspace service (`workspace.py`). Modules in `OWN_ROUTERS` serve routes outside
`/api/unified` and bring their own `router` (`enhance.py`: seed 004's routes).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from gateway.compat.errors import ERRORS, compat_response, from_validation
from services.kit.errors import KuError, http_error
from services.kit.logs import request_id_var
from services.kit.middleware import InternalError

log = logging.getLogger("ku.gateway.compat")

MODULES = ("unified", "workspace", "crossapp")
OWN_ROUTERS = ("enhance",)


class CompatRoute(APIRoute):
    """Renders any `KuError` (and invalid input) as `{"success": false, "error": ...}`,
    and so any other failure too (a 500 with the request id, logged): an old client
    reads `success` whatever went wrong."""

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
            except Exception:  # a defect, e.g. a service's answer no route expected
                log.exception("compat route %s failed", request.url.path)
                return compat_response(InternalError(request_id=request_id_var.get()))

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
