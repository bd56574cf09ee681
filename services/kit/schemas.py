"""Field types shared by every service's request schemas."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import StringConstraints

# SSO ids are 21-digit numbers: user ids are always strings, never integers.
UserId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:-]+$")
]
AppName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
]
Reference = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Description = Annotated[str, StringConstraints(max_length=500)]


def rename_milli(data: Any) -> Any:
    """`{"amount_milli": 5000}` -> `{"amount": 5000}` (still milli; the `Ku` type renders it)."""
    if isinstance(data, dict):
        return {(k[:-6] if k.endswith("_milli") else k): rename_milli(v) for k, v in data.items()}
    if isinstance(data, list):
        return [rename_milli(v) for v in data]
    return data
