from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from services.kit.money import PositiveKu
from services.kit.schemas import AppName, TextGuard, UserId


def _int_to_str(value: Any) -> Any:
    # A client that sends a 21-digit id as a JSON number still gets it exactly:
    # Python parses JSON integers without loss.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


NewUserId = Annotated[UserId, BeforeValidator(_int_to_str)]
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$"),
    TextGuard,
]
Username = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), TextGuard
]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=500), TextGuard]

EXAMPLE_ID = "101902121794505144784"


class UserCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user_id": EXAMPLE_ID, "email": "asha@example.com", "username": "Asha"}]
        },
    )
    user_id: NewUserId = Field(validation_alias=AliasChoices("user_id", "id"))
    email: Email
    username: Username | None = None
    initial_credits: Annotated[
        PositiveKu | None,
        Field(description="Admins only: the user's first credits instead of the welcome grant"),
    ] = None
    reason: Annotated[
        Reason | None,
        Field(description="Why (required with initial_credits; audited in the ledger)"),
    ] = None


class AppLinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"app": "partnerx"}]})
    app: AppName


class UserApps(BaseModel):
    user_id: str
    apps: list[str] = Field(description="Apps the user is linked to")


class User(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    user_id: str = Field(validation_alias=AliasChoices("user_id", "id"))
    username: str | None
    email: str | None
    created_at: datetime


class UserCreated(User):
    created: bool = Field(description="False when the user already existed (nothing changed)")


Role = Literal["admin"]


class RoleChange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"reason": "on-call operator, ticket OPS-112"}]},
    )
    reason: Annotated[str, StringConstraints(min_length=3, max_length=500), TextGuard] = Field(
        description="Why (kept with the grant or revocation)"
    )


class UserRoles(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"user_id": "100000000000000000042", "roles": ["admin"]}]}
    )
    user_id: str
    roles: list[Role] = Field(description="Roles held now; each adds its scope to the tokens")
