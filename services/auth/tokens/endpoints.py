"""Public token endpoints: the gateway routes them without authentication (the
SSO token or the refresh token is the credential)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from services.auth.tokens.schemas import Jwks, RefreshIn, SsoExchange, TokenPair
from services.auth.tokens.service import RefreshTokenReused, TokenService
from services.kit.db import Session
from services.kit.errors import ServiceUnavailable, Unauthorized
from services.kit.openapi import error_responses

router = APIRouter(prefix="/v1/auth", tags=["auth"])
jwks_router = APIRouter(tags=["auth"])

ERRORS = error_responses(
    {
        401: (
            "Invalid, expired or reused token",
            [
                Unauthorized("Invalid SSO token", code="invalid_sso_token", reason="expired"),
                Unauthorized("Invalid or expired refresh token", code="invalid_refresh_token"),
                RefreshTokenReused(),
            ],
        ),
        422: "Invalid input",
        503: (
            "SSO is not configured, or its keys cannot be fetched",
            [
                ServiceUnavailable("SSO is not configured", code="sso_not_configured"),
                ServiceUnavailable("SSO keys are unavailable", code="sso_keys_unavailable"),
            ],
        ),
    }
)


async def get_tokens(request: Request) -> TokenService:
    return request.app.state.tokens


Tokens = Annotated[TokenService, Depends(get_tokens)]


@router.post(
    "/sso",
    summary="Exchange the main site's SSO token for Ku tokens",
    response_model=TokenPair,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "access_token": "eyJhbGciOiJSUzI1NiIsImtpZCI6ImdhdGV3YXkt...",
                        "token_type": "Bearer",
                        "expires_in": 900,
                        "scope": "ledger:read workspace:read workspace:write generate enhance",
                        "refresh_token": "euVMqdH35DjuUQ4SFjOtyh_41olm76aya9U7OOQP...",
                        "refresh_expires_in": 2592000,
                        "user": {
                            "user_id": "101902121794505144784",
                            "username": "maria",
                            "email": "101902121794505144784@example.com",
                            "created_at": "2026-11-26T10:45:11Z",
                        },
                    }
                }
            }
        },
    },
)
async def sso_exchange(body: SsoExchange, tokens: Tokens, session: Session) -> TokenPair:
    """Exchange the main site's SSO JWT for a Ku access token and refresh token."""
    return await tokens.exchange_sso(session, body.token, app=body.app)


@router.post(
    "/refresh",
    summary="Refresh an access token",
    response_model=TokenPair,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "access_token": "eyJhbGciOiJSUzI1NiIsImtpZCI6ImdhdGV3YXkt...",
                        "token_type": "Bearer",
                        "expires_in": 900,
                        "scope": "ledger:read workspace:read workspace:write generate enhance",
                        "refresh_token": "wtFyDAGzbunV5IFdVcUoOBkY1n4ZnwuAYSXuU46s...",
                        "refresh_expires_in": 2592000,
                        "user": {
                            "user_id": "101902121794505144784",
                            "username": "maria",
                            "email": "101902121794505144784@example.com",
                            "created_at": "2026-11-26T10:45:11Z",
                        },
                    }
                }
            }
        },
    },
)
async def refresh(body: RefreshIn, tokens: Tokens, session: Session) -> Any:
    """Trade a refresh token for a new pair; the old refresh token stops working."""
    try:
        return await tokens.refresh(session, body.refresh_token)
    except RefreshTokenReused as exc:
        # The family's revocation must be committed: answer without raising.
        return JSONResponse(exc.body(), status_code=exc.status_code)


@router.post(
    "/logout", summary="Sign out (revoke a refresh token)", status_code=204, responses=ERRORS
)
async def logout(body: RefreshIn, tokens: Tokens, session: Session) -> Response:
    """End the session a refresh token belongs to (every token rotated from it)."""
    await tokens.logout(session, body.refresh_token)
    return Response(status_code=204)


@jwks_router.get(
    "/.well-known/jwks.json",
    summary="Public keys that verify Ku's access tokens",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "keys": [
                            {
                                "alg": "RS256",
                                "kty": "RSA",
                                "n": "tGsYOBe8rROhJTXYsLvygbUuST4fXxcflOjpA6qF...",
                                "e": "AQAB",
                                "kid": "gateway-test-kid",
                                "use": "sig",
                            }
                        ]
                    }
                }
            }
        }
    },
    response_model=Jwks,
)
async def jwks(tokens: Tokens, response: Response) -> dict[str, Any]:
    """Public keys that verify Ku access tokens (match the token's `kid`)."""
    response.headers["Cache-Control"] = "public, max-age=300"
    return tokens.keyring.jwks()
