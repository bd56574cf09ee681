"""Holds on the ledger for a generation, through the ledger's public contract.

A hold is made with the caller's own principal forwarded (`origin`): the ledger
checks on whose behalf we act and books it in the lane of the app the user came
through. Capture and release are ours alone (we created the hold); both are
idempotent by hold id, so a retry after a lost answer is harmless.
"""

from __future__ import annotations

from services.kit.money import milli_to_ku
from services.kit.service_client import ServiceClient


class Billing:
    def __init__(self, client: ServiceClient, hold_ttl_seconds: int) -> None:
        self.client = client
        self.hold_ttl_seconds = hold_ttl_seconds

    async def hold(
        self,
        *,
        user_id: str,
        app: str,
        amount_milli: int,
        reference: str,
        description: str,
        origin: str | None,
        ttl_seconds: int | None = None,
    ) -> str:
        """The new hold's id; raises PaymentRequired (402) when the user cannot cover it."""
        body = await self.client.json(
            "ledger",
            "POST",
            "/v1/ledger/holds",
            json={
                "user_id": user_id,
                "amount": milli_to_ku(amount_milli),
                "app": app,
                "ttl_seconds": ttl_seconds or self.hold_ttl_seconds,
                "reference": reference,
                "description": description,
            },
            idempotency_key=f"{reference}:hold",
            origin=origin,
        )
        return str(body["hold"]["id"])

    async def settle(self, hold_id: str, cost_milli: int) -> None:
        """Capture what was delivered (the ledger returns the rest), or release it all."""
        if cost_milli > 0:
            await self.client.json(
                "ledger",
                "POST",
                f"/v1/ledger/holds/{hold_id}/capture",
                json={"amount": milli_to_ku(cost_milli)},
                idempotency_key=f"capture:{hold_id}",
            )
        else:
            await self.release(hold_id)

    async def release(self, hold_id: str) -> None:
        await self.client.json(
            "ledger",
            "POST",
            f"/v1/ledger/holds/{hold_id}/release",
            idempotency_key=f"release:{hold_id}",
        )
