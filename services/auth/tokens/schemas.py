from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.auth.users.schemas import User
from services.kit.schemas import AppName, TextGuard

Jwt = Annotated[str, StringConstraints(min_length=1, max_length=8192), TextGuard]
OpaqueToken = Annotated[str, StringConstraints(min_length=1, max_length=512), TextGuard]


class SsoExchange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"token": "eyJhbGciOiJSUzI1NiIsImtpZCI6Im1haW4tMSJ9..."}]},
    )
    token: Jwt = Field(description="The main site's SSO JWT")
    app: AppName | None = Field(
        None,
        description="The app the user signs in through (links the user to it; the token's "
        "`app`, the lane the user's spending is booked in)",
    )


class RefreshIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"refresh_token": "q3V0c2lkZS1vZi10aGUtYm94..."}]},
    )
    refresh_token: OpaqueToken


class TokenPair(BaseModel):
    access_token: str = Field(
        description="Ku access token (JWT, verify with /.well-known/jwks.json)"
    )
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int = Field(description="Seconds until the access token expires")
    scope: str
    refresh_token: str = Field(description="Single use: each refresh returns a new one")
    refresh_expires_in: int
    user: User


class Jwks(BaseModel):
    keys: list[dict[str, str]]
