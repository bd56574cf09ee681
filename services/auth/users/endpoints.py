from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from services.auth.users.schemas import User, UserCreate, UserCreated
from services.auth.users.service import users
from services.kit.db import Session
from services.kit.principal import Principal, get_principal
from services.kit.schemas import UserId

router = APIRouter(prefix="/v1/users", tags=["users"])

CurrentPrincipal = Annotated[Principal, Depends(get_principal)]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid credentials"},
    403: {"description": "Missing scope, or another user's record"},
    404: {"description": "Unknown user"},
    422: {"description": "Invalid input"},
}


@router.post(
    "",
    status_code=201,
    response_model=UserCreated,
    responses={**ERRORS, 200: {"description": "The user already existed; returned unchanged"}},
)
async def create_user(
    body: UserCreate, principal: CurrentPrincipal, session: Session, response: Response
) -> UserCreated:
    """Create a user (welcome credits follow); an existing id is returned unchanged with 200."""
    principal.require_scope("users:write")
    user, created = await users.create(
        session, body.user_id, email=body.email, username=body.username
    )
    response.status_code = 201 if created else 200
    return UserCreated(
        user_id=user.id,
        username=user.username,
        email=user.email,
        created_at=user.created_at,
        created=created,
    )


@router.get("/{user_id}", response_model=User, responses=ERRORS)
async def get_user(user_id: UserId, principal: CurrentPrincipal, session: Session) -> User:
    """A user's profile (apps with `users:write`, admins, or the user's own token)."""
    if principal.kind == "user":
        principal.acts_for(user_id)
    else:
        principal.require_scope("users:write")
    return User.model_validate(await users.get(session, user_id))
