from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.kit.schemas import AppName, JsonObject, Text, TextGuard, UserId

Title = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
    TextGuard,
]
ProjectType = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$"), TextGuard
]


ContentEncoding = Literal["auto", "text", "base64"]
ContentType = Annotated[str, StringConstraints(min_length=3, max_length=100), TextGuard]

_ENCODING_HELP = (
    "`auto` (default, what old clients get): a `data:` URL or a base64 string of a PNG, JPEG, "
    "GIF or WebP image is decoded and stored as bytes, anything else is text. `text`: store "
    "as is. `base64`: decode, invalid base64 is 422."
)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectCreate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "app_source": "penora",
                    "project_type": "story",
                    "title": "The Lighthouse Keeper",
                    "content": "# Chapter 1\n\nThe lamp had not gone out in forty years...",
                    "metadata": {"model": "llama-3.1-70b", "words": 1200},
                },
                {
                    "user_id": "101902121794505144784",
                    "app_source": "imagegene",
                    "project_type": "ai_artwork",
                    "title": "Sunset Landscape AI Art",
                    "content": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAf"
                    "FcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==",
                    "metadata": {"style": "realistic", "dimensions": "1024x1024"},
                },
            ]
        },
    )
    user_id: UserId | None = Field(
        None, description="Owner. Defaults to the caller for user tokens; required for app keys."
    )
    app_source: AppName | None = Field(None, description="Defaults to the calling app")
    project_type: ProjectType | None = Field(
        None, description="Free-form kind (story, ai_artwork...); defaults to `text` or `image`"
    )
    title: Title
    content: Text = Field(description="Text, base64 image data, or a `data:` URL")
    content_encoding: ContentEncoding = Field("auto", description=_ENCODING_HELP)
    content_type: ContentType | None = Field(
        None,
        description="Optional claim (e.g. `text/markdown`); checked against the detected type",
    )
    metadata: JsonObject = Field(default_factory=dict, description="JSON object, at most 16 KB")


class ProjectUpdate(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"title": "The Lighthouse Keeper (draft 2)", "metadata": {"words": 1450}}]
        },
    )
    title: Title | None = None
    content: Text | None = None
    content_encoding: ContentEncoding = Field("auto", description=_ENCODING_HELP)
    content_type: ContentType | None = None
    metadata: JsonObject | None = Field(None, description="Replaces the metadata object")


class ProjectSummary(BaseModel):
    code: str = Field(examples=["K7QX2M"])
    user_id: str
    app_source: str
    project_type: str
    title: str
    content_type: str
    size_bytes: int
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class Project(ProjectSummary):
    content: str = Field(description="The text, or the bytes as standard base64")
    content_encoding: Literal["text", "base64"]


class ProjectPage(BaseModel):
    items: list[ProjectSummary]
    next_cursor: str | None


class Deleted(BaseModel):
    code: str
    deleted: Literal[True] = True
    size_bytes: int = Field(description="Bytes freed")
    storage: Storage


class AppUsage(BaseModel):
    app_source: str
    bytes: int
    count: int


class Storage(BaseModel):
    user_id: str
    used_bytes: int
    limit_bytes: int
    available_bytes: int
    percent: float = Field(description="used / limit × 100, two decimals")
    project_count: int
    by_app: list[AppUsage]


class QuotaUpdate(_In):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"limit_bytes": 10_485_760}]}
    )
    limit_bytes: int | None = Field(
        ge=0, le=10**12, description="Per-user limit in bytes; null restores the default"
    )


Deleted.model_rebuild()
