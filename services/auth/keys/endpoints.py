"""Admin API for apps and keys, and the gateway's key check.

`POST /internal/keys/verify` (service principals only, i.e. the gateway signing
`service_principal("gateway")`):
    request  {"key": "ku_<prefix>_<secret>"}
    200      {"app": "imagegene", "scopes": ["ledger:read", ...], "prefix": "k3v9x0qa",
              "expires_at": "2027-01-01T00:00:00Z" | null}
    401      {"error": {"code": "invalid_api_key", "message": "Invalid API key"}}
             (unknown, malformed, wrong secret, revoked or expired: one answer)
    403      {"error": {"code": "service_only", ...}} for any other principal
A gateway may cache a 200 until min(its TTL, expires_at), and drops the prefix on a
`key.revoked` event from the auth stream.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request

from services.auth.keys.schemas import (
    DEFAULT_OVERLAP_SECONDS,
    App,
    AppCreate,
    Key,
    KeyCreate,
    KeyCreated,
    KeyRotate,
    KeyRotated,
    KeyVerified,
    KeyVerify,
)
from services.auth.keys.service import keys
from services.auth.models import ApiKey
from services.kit.db import Session
from services.kit.errors import BadRequest, Conflict, Forbidden, NotFound
from services.kit.openapi import error_responses
from services.kit.principal import CurrentPrincipal, Principal
from services.kit.schemas import AppName

apps_router = APIRouter(prefix="/v1/apps", tags=["apps"])
keys_router = APIRouter(prefix="/v1/keys", tags=["keys"])
# Called by the gateway only; not part of the public API document.
internal_router = APIRouter(prefix="/internal", include_in_schema=False)

Prefix = Annotated[str, Path(pattern=r"^[a-z0-9]{8}$", examples=["k3v9x0qa"])]

ERRORS = error_responses(
    {
        401: "Missing or invalid credentials",
        403: ("Needs the admin scope", Forbidden("Missing scope: admin", code="missing_scope")),
        404: (
            "Unknown app or key",
            [
                NotFound("No such app", code="unknown_app", app="imagegene"),
                NotFound("No such key", code="unknown_key", prefix="k3v9x0qa"),
            ],
        ),
        409: (
            "App exists, or the key is revoked, expired or already rotated",
            [
                Conflict("An app with this name exists", code="app_exists", app="imagegene"),
                Conflict("This key is revoked", code="key_revoked", prefix="k3v9x0qa"),
                Conflict("This key has expired", code="key_expired", prefix="k3v9x0qa"),
                Conflict(
                    "This key was already rotated",
                    code="key_already_rotated",
                    prefix="k3v9x0qa",
                    replaced_by="p8w2m4zt",
                ),
            ],
        ),
        422: "Invalid input",
    }
)


def _admin(principal: Principal) -> None:
    principal.require_scope("admin")


def _created(row: ApiKey, key: str) -> KeyCreated:
    return KeyCreated(**Key.model_validate(row).model_dump(), key=key)


@apps_router.post(
    "",
    summary="Register an app (admin)",
    status_code=201,
    response_model=App,
    responses={
        **ERRORS,
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "name": "storyboard",
                        "description": "Storyboards from scripts",
                        "created_at": "2026-11-26T10:34:02Z",
                        "active_keys": 0,
                    }
                }
            }
        },
    },
)
async def create_app(body: AppCreate, principal: CurrentPrincipal, session: Session) -> App:
    """Register an app (penora, imagegene, a partner) that will hold API keys."""
    _admin(principal)
    app = await keys.create_app(session, body.name, body.description)
    return App.model_validate(app)


@apps_router.get(
    "", summary="List the registered apps (admin)", response_model=list[App], responses=ERRORS
)
async def list_apps(principal: CurrentPrincipal, session: Session) -> list[App]:
    """Every app, with its number of live keys."""
    _admin(principal)
    return [
        App(name=a.name, description=a.description, created_at=a.created_at, active_keys=n)
        for a, n in await keys.list_apps(session)
    ]


@keys_router.post(
    "",
    summary="Create an API key, shown once (admin)",
    status_code=201,
    response_model=KeyCreated,
    responses=ERRORS,
)
async def create_key(body: KeyCreate, principal: CurrentPrincipal, session: Session) -> KeyCreated:
    """Issue an API key for an app. The key is in this response only: store it now."""
    _admin(principal)
    if body.expires_at is not None and body.expires_in_days is not None:
        raise BadRequest("Send expires_at or expires_in_days, not both", code="ambiguous_expiry")
    expires_at = body.expires_at
    if body.expires_in_days is not None:
        expires_at = datetime.now(UTC) + timedelta(days=body.expires_in_days)
    row, key = await keys.create_key(
        session, body.app, list(body.scopes), expires_at=expires_at, name=body.name
    )
    return _created(row, key)


@keys_router.get("", summary="List API keys (admin)", response_model=list[Key], responses=ERRORS)
async def list_keys(
    principal: CurrentPrincipal, session: Session, app: AppName | None = None
) -> list[Key]:
    """Every key (never the secret), optionally of one app."""
    _admin(principal)
    return [Key.model_validate(k) for k in await keys.list_keys(session, app)]


@keys_router.get(
    "/{prefix}", summary="One API key, by its prefix (admin)", response_model=Key, responses=ERRORS
)
async def get_key(prefix: Prefix, principal: CurrentPrincipal, session: Session) -> Key:
    """One key by its prefix (never the secret)."""
    _admin(principal)
    return Key.model_validate(await keys.get_key(session, prefix))


@keys_router.post(
    "/{prefix}/revoke", summary="Revoke an API key (admin)", response_model=Key, responses=ERRORS
)
async def revoke_key(prefix: Prefix, principal: CurrentPrincipal, session: Session) -> Key:
    """Revoke a key now; gateways drop it within seconds. Revoking twice is harmless."""
    _admin(principal)
    return Key.model_validate(await keys.revoke(session, prefix))


@keys_router.post(
    "/{prefix}/rotate",
    summary="Rotate an API key, with an overlap (admin)",
    status_code=201,
    response_model=KeyRotated,
    responses=ERRORS,
)
async def rotate_key(
    prefix: Prefix,
    principal: CurrentPrincipal,
    session: Session,
    body: KeyRotate | None = None,
) -> KeyRotated:
    """Issue a replacement key (shown once); the old one works for `overlap_seconds` more."""
    _admin(principal)
    overlap = body.overlap_seconds if body else DEFAULT_OVERLAP_SECONDS
    new, key, old = await keys.rotate(session, prefix, overlap)
    return KeyRotated(**_created(new, key).model_dump(), previous=Key.model_validate(old))


@internal_router.post("/keys/verify", response_model=KeyVerified)
async def verify_key(
    body: KeyVerify, request: Request, principal: CurrentPrincipal, session: Session
) -> KeyVerified:
    """Check an API key for the gateway: its app, scopes and expiry, or 401 invalid_api_key."""
    if principal.kind != "service":
        raise Forbidden("Only services may verify keys", code="service_only")
    settings = request.app.state.settings
    row = await keys.verify(session, body.key, touch_seconds=settings.auth_key_touch_seconds)
    return KeyVerified(
        app=row.app, scopes=list(row.scopes), prefix=row.prefix, expires_at=row.expires_at
    )
