"""Exact money: the API speaks Ku (JSON numbers, at most 3 decimals); storage and
arithmetic use integer milli-Ku. No float takes part in any arithmetic: a JSON
number is read through its decimal text, and milli-Ku are turned back into a
number only for display."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

MILLI_PER_KU = 1000
MAX_KU = Decimal(10) ** 12


def ku_to_milli(value: Any) -> int:
    """Parse a Ku amount (int, float read through its repr, str or Decimal) into milli-Ku."""
    if isinstance(value, bool):
        raise ValueError("amount must be a number")
    if isinstance(value, float):
        value = repr(value)
    try:
        amount = Decimal(value) if not isinstance(value, Decimal) else value
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError("amount must be a number") from None
    if not amount.is_finite():
        raise ValueError("amount must be a finite number")
    if abs(amount) >= MAX_KU:
        raise ValueError("amount is too large")
    milli = amount * MILLI_PER_KU
    if milli != milli.to_integral_value():
        raise ValueError("amount has more than 3 decimals")
    return int(milli)


def milli_to_ku(milli: int) -> int | float:
    """A JSON-friendly Ku number: an int when whole, else the exact 3-decimal value."""
    if milli % MILLI_PER_KU == 0:
        return milli // MILLI_PER_KU
    # str(Decimal) is exact; float() of a <=3-decimal string is its shortest repr.
    return float(Decimal(milli).scaleb(-3))


def _positive(value: Any) -> int:
    milli = ku_to_milli(value)
    if milli <= 0:
        raise ValueError("amount must be greater than 0")
    return milli


_KU_SCHEMA = WithJsonSchema(
    {"type": "number", "multipleOf": 0.001, "description": "Ku, at most 3 decimals"}
)

# Request field: a positive Ku amount, held as int milli-Ku after validation.
PositiveKu = Annotated[int, BeforeValidator(_positive), _KU_SCHEMA]
# Response field: int milli-Ku rendered as a Ku number.
Ku = Annotated[int, PlainSerializer(milli_to_ku, return_type=Any), _KU_SCHEMA]
