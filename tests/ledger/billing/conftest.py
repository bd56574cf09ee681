"""Billing tests run the real Razorpay client against a local fake Razorpay."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.ledger.billing.fake_razorpay import FakeRazorpay

SETTINGS = (
    "razorpay_key_id",
    "razorpay_key_secret",
    "razorpay_webhook_secret",
    "razorpay_base_url",
)


@pytest.fixture(scope="session")
async def razorpay(ledger: httpx.AsyncClient) -> AsyncIterator[FakeRazorpay]:
    """The fake Razorpay, with the ledger's settings (and the environment, for the CLI)
    pointed at it."""
    from services.ledger.config import get_settings

    fake = FakeRazorpay(
        key_id="rzp_test_" + secrets.token_hex(6),
        key_secret=secrets.token_urlsafe(18),
        webhook_secret=secrets.token_urlsafe(18),
    )
    url = await fake.start()
    values = dict(
        zip(SETTINGS, (fake.key_id, fake.key_secret, fake.webhook_secret, url), strict=True)
    )
    settings = get_settings()
    saved = {name: getattr(settings, name) for name in SETTINGS}
    for name, value in values.items():
        setattr(settings, name, value)
        os.environ[f"KU_{name.upper()}"] = value
    try:
        yield fake
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
            os.environ.pop(f"KU_{name.upper()}", None)
        await fake.stop()


@pytest.fixture
def buyer(funded_user: Callable[..., Awaitable[str]]) -> Callable[..., Awaitable[str]]:
    """A user with a ledger account and `amount` Ku of promo credit (default none)."""

    async def make(amount: float | int = 0, **grant: Any) -> str:
        return await funded_user(amount, **grant)

    return make
