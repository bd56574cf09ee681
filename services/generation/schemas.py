from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.kit.money import Ku
from services.kit.schemas import Text, TextGuard, UserId

Prompt = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000), TextGuard
]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="Sampling temperature, 0-2")]
MaxWords = Annotated[int, Field(ge=1, le=20_000, description="Most words to generate")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = Field(description="The provider serving it")
    name: str
    multiplier: float = Field(description="Credit multiplier (1 Ku per 100 words × this)")
    price_per_100_words: Ku
    max_words: int
    fallback: list[str]
    offline: bool


class ModelList(BaseModel):
    """OpenAI's list shape (`object`, `data`), with Ku's pricing on every model."""

    object: Literal["list"] = "list"
    data: list[ModelOut]


class EstimateIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "mistralai/Mistral-7B-Instruct-v0.3", "max_words": 800}]
        },
    )
    model: Text | None = Field(None, description="Default: the catalog's first model")
    max_words: MaxWords = 500
    chapters: int | None = Field(None, ge=1, le=50, description="For a story: its chapters")


class Estimate(BaseModel):
    model: str
    max_words: int
    words_rule: str
    cost: Ku = Field(description="At most this, at this model's price")
    max_cost: Ku = Field(description="What is held: the dearest model of the fallback chain")


class TextIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "prompt": "Write a short opening paragraph for a mystery set in Lisbon.",
                    "model": "mistralai/Mistral-7B-Instruct-v0.3",
                    "max_words": 200,
                    "temperature": 0.7,
                    "save": True,
                    "title": "Lisbon mystery, opening",
                }
            ]
        },
    )
    user_id: UserId | None = Field(None, description="App keys: the user; user tokens: omit")
    prompt: Prompt
    system: Annotated[str, StringConstraints(max_length=4000), TextGuard] | None = None
    model: Text | None = None
    max_words: MaxWords = 500
    temperature: Temperature = 0.7
    stream: bool = False
    save: bool = Field(False, description="Also save the result to the user's workspace")
    title: Annotated[str, StringConstraints(min_length=1, max_length=200), TextGuard] | None = None


class GenerationOut(BaseModel):
    id: str
    status: str
    model: str
    served_model: str
    provider: str | None
    offline: bool = Field(description="Made by the offline development provider, not a model")
    text: str
    words: int
    cost: Ku
    held: Ku
    finish_reason: str
    latency_ms: int
    project_code: str | None = None
    save_error: dict[str, Any] | None = None


class HistoryItem(BaseModel):
    id: str
    kind: str
    app: str
    status: str
    model: str
    served_model: str | None
    provider: str | None
    offline: bool
    prompt: str
    output: str | None
    words: int
    cost: Ku
    latency_ms: int | None
    project_code: str | None
    created_at: datetime


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    next_cursor: str | None


ToolName = Literal["complete", "rewrite", "describe", "brainstorm"]


class ToolIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "topic": "names for a seaside bakery",
                    "count": 5,
                    "max_words": 120,
                }
            ]
        },
    )
    user_id: UserId | None = None
    model: Text | None = None
    max_words: MaxWords = 300
    temperature: Temperature = 0.8
    stream: bool = False
    save: bool = False
    text: Annotated[str, StringConstraints(max_length=20_000), TextGuard] | None = Field(
        None, description="complete: the text so far; rewrite: the passage"
    )
    instructions: Annotated[str, StringConstraints(max_length=2000), TextGuard] | None = Field(
        None, description="complete/rewrite: what to do (tone, direction)"
    )
    subject: Annotated[str, StringConstraints(max_length=2000), TextGuard] | None = Field(
        None, description="describe: what to describe"
    )
    topic: Annotated[str, StringConstraints(max_length=2000), TextGuard] | None = Field(
        None, description="brainstorm: the topic"
    )
    count: int = Field(8, ge=1, le=30, description="brainstorm: how many ideas")


class StoryIn(_In):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "101902121794505144784",
                    "premise": "A lighthouse keeper finds letters sent to her from the future.",
                    "title": "Letters from the Tide",
                    "chapters": 3,
                    "words_per_chapter": 400,
                }
            ]
        },
    )
    user_id: UserId | None = None
    premise: Prompt
    title: Annotated[str, StringConstraints(min_length=1, max_length=200), TextGuard] | None = None
    chapters: int = Field(3, ge=1, le=20)
    words_per_chapter: int = Field(500, ge=20, le=4000)
    model: Text | None = None
    temperature: Temperature = 0.8


class StoryPartOut(BaseModel):
    n: int
    kind: Literal["outline", "chapter"]
    status: str
    text: str | None
    words: int
    cost: Ku
    served_model: str | None
    provider: str | None


class StoryOut(BaseModel):
    id: str
    status: str
    title: str | None
    premise: str
    model: str
    chapters: int
    words_per_chapter: int
    runs: int
    error: str | None
    cost: Ku
    held: Ku
    parts: list[StoryPartOut]
    project_code: str | None
    created_at: datetime
