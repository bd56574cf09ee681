"""The auth service: users, SSO exchange, Ku access tokens (JWKS), apps and API keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from services.auth.api import routers
from services.auth.config import AuthSettings, get_settings
from services.auth.models import SCHEMA
from services.auth.tokens.service import TokenService
from services.auth.tokens.signing import load_keyring
from services.auth.tokens.sso import SsoVerifier
from services.kit.app import create_service_app

DESCRIPTION = """
Ku's identity service.

- **Users** are created by an app with `users:write` or on first SSO login.
- **SSO**: `POST /v1/auth/sso` exchanges the main site's JWT for a Ku access token
  (RS256/ES256, 15 minutes; public keys at `/.well-known/jwks.json`) and a
  single-use, rotating refresh token.
- **Apps and API keys** (admin): keys are shown once, scoped, revocable and
  rotatable with an overlap window.
"""

OPENAPI_TAGS = [
    {"name": "users", "description": "Ku users (string ids; SSO ids are 21-digit numbers)"},
    {"name": "auth", "description": "SSO exchange, refresh, logout and the JWKS"},
    {"name": "apps", "description": "Apps that hold API keys (admin)"},
    {"name": "keys", "description": "API keys: create, list, revoke, rotate (admin)"},
]


@asynccontextmanager
async def token_issuer(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan hook: the signing key (shared through the database in development)
    and the SSO verifier with its JWKS client."""
    settings: AuthSettings = app.state.settings
    keyring = await load_keyring(settings, app.state.sessionmaker)
    async with httpx.AsyncClient(timeout=5.0) as http:
        app.state.tokens = TokenService(settings, keyring, SsoVerifier(settings, http))
        yield


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    return create_service_app(
        name="auth",
        settings=settings,
        routers=routers,
        title="Ku Auth",
        description=DESCRIPTION,
        outbox_schema=SCHEMA,
        hooks=[token_issuer],
        openapi_tags=OPENAPI_TAGS,
    )
