from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.kit.principal import SCOPES
from services.kit.schemas import AppName, TextGuard

DEFAULT_OVERLAP_SECONDS = 3600

Scope = Literal[SCOPES]  # type: ignore[valid-type]
KeyName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), TextGuard
]


class AppCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "imagegene", "description": "ImageGene web and mobile"}]
        },
    )
    name: AppName
    description: Annotated[str, StringConstraints(max_length=500), TextGuard] | None = None


class App(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    description: str | None
    created_at: datetime
    active_keys: int = 0


class KeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "app": "imagegene",
                    "scopes": ["ledger:read", "ledger:write", "users:write"],
                    "expires_in_days": 365,
                    "name": "production web",
                }
            ]
        },
    )
    app: AppName
    scopes: list[Scope] = Field(min_length=1)
    expires_at: datetime | None = Field(None, description="Absolute expiry (or expires_in_days)")
    expires_in_days: int | None = Field(None, ge=1, le=3650)
    name: KeyName | None = None


class Key(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    prefix: str
    app: str
    scopes: list[str]
    name: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    replaced_by: str | None = Field(description="Set by a rotation: the new key's prefix")


class KeyCreated(Key):
    key: str = Field(description="The secret key. Shown once: store it now")


class KeyRotate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"overlap_seconds": 86400}]}
    )
    overlap_seconds: int = Field(
        DEFAULT_OVERLAP_SECONDS,
        ge=0,
        le=30 * 86_400,
        description="How long the old key keeps working (0: stop now)",
    )


class KeyRotated(KeyCreated):
    previous: Key


class KeyVerify(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: Annotated[str, StringConstraints(max_length=512), TextGuard]


class KeyVerified(BaseModel):
    app: str
    scopes: list[str]
    prefix: str
    expires_at: datetime | None
