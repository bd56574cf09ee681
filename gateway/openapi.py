"""One OpenAPI document for partners: the gateway's own routes (compat API, events)
plus every service's public `/v1/` paths, fetched from each service and merged.

Schema names that two services define differently are prefixed with the
service's name (`LedgerBalance`), and that service's references rewritten.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from gateway.access import PUBLIC_PATHS
from gateway.upstream import SERVICES, Upstreams
from services.kit.errors import (
    KuError,
    ServiceUnavailable,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
)
from services.kit.openapi import error_responses

CACHE_SECONDS = 30.0
SECURITY_SCHEMES = {
    "ApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An app's API key (`ku_<prefix>_<secret>`), from `ku keys create`.",
    },
    "ApiKeyQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "api_key",
        "description": "The same key as a query parameter, for old clients only (discouraged).",
    },
    "Bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A Ku access token from `POST /v1/auth/sso` (RS256/ES256).",
    },
}
DESCRIPTION = """
Ku: one credit balance, one workspace and one identity for a family of AI apps.

Authenticate with an app's API key (`X-API-Key` header) or a user's Ku access
token (`Authorization: Bearer ...`). A user token acts only for its own user.
Amounts are Ku as JSON numbers with at most 3 decimals. Every money-moving POST
takes an `Idempotency-Key` header (or a natural `reference`): retries replay.
Errors are `{"error": {"code", "message", "detail"}}`; the `/api/unified/*`
compatibility API answers in its old shape `{"success": false, "error": ...}`.
Responses carry `RateLimit-*` headers; 429 carries `Retry-After`.
"""

# What the gateway itself may answer on any operation it proxies, whatever the service
# documents: the rate limit, and a service it cannot reach in time.
GATEWAY_ERRORS = {
    str(status): {
        "description": response["description"],
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorBody"},
                **response["content"]["application/json"],
            }
        },
    }
    for status, response in error_responses(
        {
            429: (
                "Rate limited: retry after `Retry-After` seconds",
                TooManyRequests(retry_after=12),
            ),
            502: (
                "The service behind this route is unreachable",
                UpstreamError("The ledger service is unreachable", service="ledger"),
            ),
            503: (
                "The service behind this route is unavailable",
                ServiceUnavailable(
                    "The ledger service is unavailable",
                    code="upstream_unavailable",
                    service="ledger",
                ),
            ),
            504: (
                "The service behind this route timed out",
                UpstreamTimeout("The ledger service timed out", service="ledger"),
            ),
        }
    ).items()
}


def merge(own: dict[str, Any], services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    doc = copy.deepcopy(own)
    doc["info"] = {
        "title": "Ku API",
        "version": own.get("info", {}).get("version", "1.0.0"),
        "description": DESCRIPTION.strip(),
    }
    paths: dict[str, Any] = doc.setdefault("paths", {})
    components = doc.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    tags = {t["name"]: t for t in doc.get("tags", [])}
    for service, spec in services.items():
        spec = _rename_conflicts(service, spec, schemas)
        for path, item in spec.get("paths", {}).items():
            if path.startswith("/v1/") or path.startswith("/.well-known/"):
                paths[path] = copy.deepcopy(item)
        schemas.update(spec.get("components", {}).get("schemas", {}))
        for tag in spec.get("tags", []):
            tags.setdefault(tag["name"], tag)
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                for status, response in GATEWAY_ERRORS.items():
                    operation["responses"].setdefault(status, copy.deepcopy(response))
    components["securitySchemes"] = SECURITY_SCHEMES
    doc["security"] = [{"ApiKey": []}, {"Bearer": []}, {"ApiKeyQuery": []}]
    for path in PUBLIC_PATHS:
        for operation in paths.get(path, {}).values():
            if isinstance(operation, dict):
                operation["security"] = []
    if tags:
        doc["tags"] = list(tags.values())
    return doc


def _rename_conflicts(
    service: str, spec: dict[str, Any], existing: dict[str, Any]
) -> dict[str, Any]:
    theirs = spec.get("components", {}).get("schemas", {})
    clashes = [n for n, s in theirs.items() if n in existing and existing[n] != s]
    if not clashes:
        return spec
    text = orjson.dumps(spec).decode()
    prefix = service.capitalize()
    for name in clashes:
        ref = '"#/components/schemas/'
        text = text.replace(f'{ref}{name}"', f'{ref}{prefix}{name}"')
    renamed = orjson.loads(text)
    renamed_schemas = renamed["components"]["schemas"]
    for name in clashes:
        renamed_schemas[prefix + name] = renamed_schemas.pop(name)
    return renamed


class MergedOpenAPI:
    def __init__(self, upstreams: Upstreams, own: Callable[[], dict[str, Any]]) -> None:
        self.upstreams = upstreams
        self.own = own
        self._doc: dict[str, Any] | None = None
        self._at = 0.0
        self._complete = False

    async def document(self) -> dict[str, Any]:
        ttl = CACHE_SECONDS if self._complete else 2.0
        if self._doc is None or time.monotonic() - self._at > ttl:
            results = await asyncio.gather(*(self._fetch(s) for s in SERVICES))
            found = {s: d for s, d in zip(SERVICES, results, strict=True) if d is not None}
            self._doc = merge(self.own(), found)
            self._complete = len(found) == len(SERVICES)
            self._at = time.monotonic()
        return self._doc

    async def _fetch(self, service: str) -> dict[str, Any] | None:
        try:
            status, body = await self.upstreams.call(
                service, "GET", "/openapi.json", principal=None, timeout_seconds=2
            )
        except KuError:
            return None
        return body if status == 200 and isinstance(body, dict) else None


# Swagger UI and ReDoc as published on npm (swagger-ui-dist, redoc), vendored with their
# licences under gateway/static/vendor/ (see VENDOR.md there): the docs work without
# internet, and the browser loads nothing from another origin.
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_URL = "/static"
SWAGGER = f"{STATIC_URL}/vendor/swagger-ui"
REDOC = f"{STATIC_URL}/vendor/redoc"


def add_docs_routes(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """`/static` (vendored assets), `/docs` (Swagger UI) and `/redoc`, all same-origin."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title="Ku API",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
            # No badge that asks swagger.io to validate the document.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url,
            title="Ku API",
            redoc_js_url=f"{REDOC}/redoc.standalone.js",
            redoc_favicon_url=f"{SWAGGER}/favicon-32x32.png",
            with_google_fonts=False,
        )
        # ReDoc's sidebar always asks cdn.redoc.ly for its logo; images only from here
        # (the logo is then hidden, by ReDoc's own error handler).
        page.headers["content-security-policy"] = "img-src 'self' data:"
        return page
