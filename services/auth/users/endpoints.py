from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.users.schemas import (
    AppLinkIn,
    Role,
    RoleChange,
    User,
    UserApps,
    UserCreate,
    UserCreated,
    UserRoles,
)
from services.auth.users.service import users
from services.kit.authority import denied_user, kind_of
from services.kit.db import Session
from services.kit.errors import Forbidden, NotFound, Unprocessable
from services.kit.openapi import STANDARD, error_responses
from services.kit.principal import CurrentPrincipal, Principal
from services.kit.schemas import UserId

router = APIRouter(prefix="/v1/users", tags=["users"])


async def _unlinked_partner(session: AsyncSession, principal: Principal, user_id: str) -> bool:
    """A partner's key (`kind_of`, docs/ledger.md authority: an app key without
    `users:any`) for a user not linked to its app: it reads no such user's profile."""
    if kind_of(principal) != "partner":
        return False
    return principal.app is None or principal.app not in await users.apps(session, user_id)


ERRORS = error_responses(
    {
        401: "Missing or invalid credentials",
        403: (
            "Missing scope, or another user's record",
            [
                Forbidden("Missing scope: users:write", code="missing_scope"),
                Forbidden("A user token may act only on its own user", code="wrong_user"),
                Forbidden("This app may act only for users linked to it", code="user_not_linked"),
            ],
        ),
        404: (
            "Unknown user",
            NotFound("No such user", code="unknown_user", user_id="101902121794505144784"),
        ),
        422: (
            "Invalid input",
            [Unprocessable("No such app", code="unknown_app", app="penora"), STANDARD[422]],
        ),
    }
)


@router.post(
    "",
    status_code=201,
    response_model=UserCreated,
    summary="Create a user (idempotent)",
    responses={
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "username": "maria",
                        "email": "maria@example.com",
                        "created_at": "2026-11-26T10:34:02Z",
                        "created": True,
                    }
                }
            }
        },
        **ERRORS,
        200: {"description": "The user already existed; returned unchanged"},
    },
)
async def create_user(
    body: UserCreate, principal: CurrentPrincipal, session: Session, response: Response
) -> UserCreated:
    """Create a user (welcome credits follow, or an admin's `initial_credits` instead);
    an existing id is returned unchanged with 200. A partner app's new user is linked
    to it."""
    principal.require_scope("users:write")
    if body.initial_credits is not None:
        if not principal.is_admin:
            raise Forbidden("Only an admin sets initial credits", code="forbidden")
        if not body.reason:
            raise Unprocessable("Initial credits need a reason", code="reason_required")
    user, created = await users.create(
        session,
        body.user_id,
        email=body.email,
        username=body.username,
        initial_credits_milli=body.initial_credits,
        created_by=principal.who,
        reason=body.reason,
    )
    if created and principal.kind == "app" and principal.app and not principal.is_admin:
        if "users:any" not in principal.scopes:
            await users.link(session, user.id, principal.app, strict=False)
    response.status_code = 201 if created else 200
    # An existing user a partner is not linked to: it learns the id exists (it could not
    # create it), not the user's profile.
    hide = not created and await _unlinked_partner(session, principal, user.id)
    return UserCreated(
        user_id=user.id,
        username=None if hide else user.username,
        email=None if hide else user.email,
        created_at=user.created_at,
        created=created,
    )


@router.get(
    "/{user_id}",
    response_model=User,
    summary="A user's profile",
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "user_id": "101902121794505144784",
                        "username": "maria",
                        "email": "maria@example.com",
                        "created_at": "2026-11-26T10:34:02Z",
                    }
                }
            }
        },
    },
)
async def get_user(user_id: UserId, principal: CurrentPrincipal, session: Session) -> User:
    """A user's profile (apps with `users:write`, admins, or the user's own token)."""
    if principal.kind == "user":
        principal.acts_for(user_id)
    else:
        principal.require_scope("users:write")
        if await _unlinked_partner(session, principal, user_id):
            raise denied_user(f"linked:{principal.app}")
    return User.model_validate(await users.get(session, user_id))


@router.post(
    "/{user_id}/apps",
    summary="Link a user to an app",
    response_model=UserApps,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {"user_id": "101902121794505144784", "apps": ["penora"]}
                }
            }
        },
    },
)
async def link_app(
    user_id: UserId, body: AppLinkIn, principal: CurrentPrincipal, session: Session
) -> UserApps:
    """Admins: link a user to an app, so that app's partner keys may act for them."""
    principal.require_scope("admin")
    await users.get(session, user_id)
    await users.link(session, user_id, body.app)
    return UserApps(user_id=user_id, apps=await users.apps(session, user_id))


@router.get(
    "/{user_id}/apps",
    summary="The apps a user is linked to",
    response_model=UserApps,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {"user_id": "101902121794505144784", "apps": ["penora"]}
                }
            }
        },
    },
)
async def list_apps(user_id: UserId, principal: CurrentPrincipal, session: Session) -> UserApps:
    """The apps a user is linked to (admins, or the user's own token)."""
    if principal.kind == "user":
        principal.acts_for(user_id)
    else:
        principal.require_scope("admin")
    await users.get(session, user_id)
    return UserApps(user_id=user_id, apps=await users.apps(session, user_id))


async def _roles(session: AsyncSession, user_id: str) -> UserRoles:
    roles = await users.roles(session, user_id)
    return UserRoles.model_validate({"user_id": user_id, "roles": roles})


ROLE_ERRORS = error_responses(
    {
        401: "Missing or invalid credentials",
        403: (
            "Not an admin, or another user's roles",
            [
                Forbidden("Missing scope: admin", code="missing_scope"),
                Forbidden("A user token may act only on its own user", code="wrong_user"),
            ],
        ),
        404: (
            "Unknown user",
            NotFound("No such user", code="unknown_user", user_id="101902121794505144784"),
        ),
        422: "Invalid input (a grant or revocation needs a reason)",
    }
)


@router.get(
    "/{user_id}/roles",
    response_model=UserRoles,
    summary="A user's roles",
    responses=ROLE_ERRORS,
)
async def list_roles(user_id: UserId, principal: CurrentPrincipal, session: Session) -> UserRoles:
    """The roles a user holds now (admins, or the user's own token). `admin` puts the
    admin scope in the user's access tokens and lets the account sign in to the console."""
    if principal.kind == "user":
        principal.acts_for(user_id)
    else:
        principal.require_scope("admin")
    await users.get(session, user_id)
    return await _roles(session, user_id)


@router.put(
    "/{user_id}/roles/{role}",
    response_model=UserRoles,
    summary="Give a user a role (admin)",
    responses=ROLE_ERRORS,
)
async def grant_role(
    user_id: UserId, role: Role, body: RoleChange, principal: CurrentPrincipal, session: Session
) -> UserRoles:
    """Admins: give a user a role, with a reason (kept with who gave it). Idempotent.
    The user's next access token (at sign-in or refresh) carries the role's scope."""
    principal.require_scope("admin")
    await users.grant_role(session, user_id, role, by=principal.who, reason=body.reason)
    return await _roles(session, user_id)


@router.post(
    "/{user_id}/roles/{role}/revoke",
    response_model=UserRoles,
    summary="Take a role from a user (admin)",
    responses=ROLE_ERRORS,
)
async def revoke_role(
    user_id: UserId, role: Role, body: RoleChange, principal: CurrentPrincipal, session: Session
) -> UserRoles:
    """Admins: take a role back, with a reason (kept on the record). Idempotent. Tokens
    already issued keep their scope until they expire; the console checks on every page."""
    principal.require_scope("admin")
    await users.revoke_role(session, user_id, role, by=principal.who, reason=body.reason)
    return await _roles(session, user_id)
