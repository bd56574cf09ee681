"""Billing tests run the real Razorpay client against a local fake Razorpay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.ledger.billing.fake_razorpay import FakeRazorpay, configured_razorpay


@pytest.fixture(scope="session")
async def razorpay(ledger: httpx.AsyncClient) -> AsyncIterator[FakeRazorpay]:
    """The fake Razorpay, with the ledger's settings (and the environment, for the CLI)
    pointed at it."""
    async with configured_razorpay() as fake:
        yield fake


@pytest.fixture
def buyer(funded_user: Callable[..., Awaitable[str]]) -> Callable[..., Awaitable[str]]:
    """A user with a ledger account and `amount` Ku of promo credit (default none)."""

    async def make(amount: float | int = 0, **grant: Any) -> str:
        return await funded_user(amount, **grant)

    return make
