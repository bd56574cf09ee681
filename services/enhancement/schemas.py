from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.kit.money import Ku, PositiveKu
from services.kit.schemas import AppName, Reference, Text, UserId

EnhancementType = Literal["lighting", "style", "background", "mood", "custom"]
Status = Literal["pending", "processing", "completed", "failed"]


class TaskCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image_url": "https://example.com/image.jpg",
                    "enhancement_type": "lighting",
                    "prompt": "warm golden hour lighting",
                    "strength": 0.8,
                }
            ]
        },
    )
    image_url: str | None = Field(None, max_length=2048, description="http(s) URL of the image")
    project_code: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9]{1,16}$",
        description="Or: a workspace project holding the image",
    )
    enhancement_type: EnhancementType
    prompt: str = Field("", max_length=2000)
    strength: float = Field(0.8, ge=0, le=1)
    moodboard_id: str | None = Field(None, max_length=200)
    user_id: UserId | None = Field(None, description="For app keys: on whose behalf")
    app: AppName | None = Field(None, description="The app lane to charge (default: the caller's)")
    save_to_workspace: bool = False


class TaskError(BaseModel):
    code: str
    message: str | None


class Task(BaseModel):
    id: str
    user_id: str
    app: str
    status: Status
    progress: int
    enhancement_type: str
    prompt: str
    strength: float
    moodboard_id: str | None
    input_source: str
    width: int
    height: int
    price: Ku = Field(description="Ku held at submit (0 when an included enhancement paid)")
    included: bool = Field(description="Paid by the monthly allowance")
    charged: Ku = Field(description="Ku captured once settled")
    settled: bool
    provider: str | None
    degraded: bool
    result_url: str | None = Field(description="Signed, expiring link to the result image")
    project_code: str | None
    error: TaskError | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class TaskPage(BaseModel):
    items: list[Task]


class PoolOut(BaseModel):
    provider: str
    balance: Ku
    level: Ku
    consumed: Ku
    cost_per_call: Ku
    percent_left: float
    low: bool
    breaker: str
    active: bool


class RefillIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount": 5000, "reference": "invoice-2026-11-nb"}]},
    )
    amount: PositiveKu
    reference: Reference | None = Field(None, description="Retrying with it never refills twice")


class TierIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tier": "plus"}]})
    tier: Text = Field(min_length=1, max_length=32)


class AllowanceOut(BaseModel):
    user_id: str
    tier: str
    period: str
    included: int = Field(description="The tier's included enhancements a month")
    granted: int = Field(
        description="The month's allowance granted in the ledger (made at the month's first "
        "included enhancement or on the 1st; it expires at the month's end)"
    )
    used: int = Field(description="Included enhancements drawn this month and not given back")
    remaining: int


class AlertOut(BaseModel):
    id: int
    kind: str
    subject: str
    message: str
    detail: dict[str, Any]
    created_at: datetime


class AlertPage(BaseModel):
    items: list[AlertOut]


class ProcessResult(BaseModel):
    failed_overdue: int
    settled: int
    enqueued: int
