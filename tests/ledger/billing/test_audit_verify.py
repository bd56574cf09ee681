"""`POST /v1/billing/verify` under the authority table's `billing.buy` row: a partner
acts only for users linked to it, as on every other billing route (audit)."""

from __future__ import annotations

import asyncpg

from services.kit.db import plain_url
from services.kit.testing.plugin import principal_headers
from tests.ledger.billing.helpers import paid_order


def acme() -> dict[str, str]:
    """A partner key: `ledger:write` (billing.buy), no `users:any`."""
    return principal_headers("app", app="acme", scopes=("ledger:read", "ledger:write"))


async def verify_as(ledger, headers, order_id, payment_id, signature):
    return await ledger.post(
        "/v1/billing/verify",
        json={
            "razorpay_order_id": order_id,
            "razorpay_payment_id": payment_id,
            "razorpay_signature": signature,
        },
        headers=headers,
    )


class TestVerifyIsTheBuyersOrTheirApps:
    async def test_a_partner_verifies_only_its_linked_users_orders(
        self, ledger, razorpay, buyer, ku_database_url
    ):
        alice = await buyer()
        ours, payment = await paid_order(ledger, razorpay, alice)
        signature = razorpay.checkout_signature(ours["razorpay_order_id"], payment["id"])
        r = await verify_as(ledger, acme(), ours["razorpay_order_id"], payment["id"], signature)
        assert r.status_code == 403, r.text  # was 200 with Alice's payment
        assert r.json()["error"]["code"] == "user_not_linked"
        conn = await asyncpg.connect(plain_url(ku_database_url))
        try:
            await conn.execute(
                "INSERT INTO ledger.app_links (user_id, app) VALUES ($1, 'acme')", alice
            )
        finally:
            await conn.close()
        r = await verify_as(ledger, acme(), ours["razorpay_order_id"], payment["id"], signature)
        assert r.status_code == 200, r.text
        assert r.json()["outcome"] == "granted"
