"""`POST /api/cross-app/auth` (seed 003): the old Penora/ImageGene clients' SSO exchange.

The main site's JWT in, a Ku session out, in the seeds' `{"success": ...}` shape. It is
the native `POST /v1/auth/sso` underneath (same verification: algorithm allow-list,
exp/nbf/iss/aud); signing in through an app links the user to it. Public like its
native twin (the token is the credential), rate-limited per address.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints

from gateway.access import client_ip
from gateway.upstream import Upstreams
from services.kit.schemas import AppName, TextGuard

Jwt = Annotated[str, StringConstraints(min_length=1, max_length=8192), TextGuard]


class CrossAppAuth(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"token": "eyJhbGciOiJIUzI1NiJ9...", "app": "imagegene"}]},
    )
    token: Jwt = Field(
        validation_alias=AliasChoices("token", "sso_token", "jwt"),
        description="The main site's SSO JWT",
    )
    app: AppName | None = Field(
        None,
        validation_alias=AliasChoices("app", "app_name"),
        description="The app the user signs in through (penora, imagegene, a partner)",
    )


def register(router: APIRouter) -> None:
    legacy = APIRouter(
        route_class=router.route_class, tags=["compatibility"], responses=router.responses
    )

    @legacy.post(
        "/api/cross-app/auth",
        summary="Sign in across apps with an SSO token (old clients)",
        openapi_extra={"security": []},
    )
    async def cross_app_auth(request: Request, body: CrossAppAuth) -> dict[str, Any]:
        """Exchange the main site's SSO token for a Ku session (older clients' route)."""
        gateway = request.app.state.gateway
        raw = {k: v for k, v in request.scope["headers"] if k == b"x-forwarded-for"}
        await gateway.access.admit_anonymous(client_ip(request.scope, raw, gateway.settings))
        upstreams: Upstreams = gateway.upstreams
        payload: dict[str, Any] = {"token": body.token}
        if body.app:
            payload["app"] = body.app
        pair = await upstreams.json("auth", "POST", "/v1/auth/sso", principal=None, json=payload)
        user = pair.get("user") or {}
        return {
            "success": True,
            "authenticated": True,
            "user_id": user.get("user_id"),
            "user": user,
            "app": body.app,
            "access_token": pair["access_token"],
            "token_type": "Bearer",
            "expires_in": pair["expires_in"],
            "refresh_token": pair["refresh_token"],
        }

    router.routes.extend(legacy.routes)
