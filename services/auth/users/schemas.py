from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from services.kit.schemas import TextGuard, UserId


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


class User(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    user_id: str = Field(validation_alias=AliasChoices("user_id", "id"))
    username: str | None
    email: str | None
    created_at: datetime


class UserCreated(User):
    created: bool = Field(description="False when the user already existed (nothing changed)")
