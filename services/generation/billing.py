"""Holds on the ledger for a generation, through the ledger's public contract.

A hold is made with the caller's own principal forwarded (`origin`): the ledger
checks on whose behalf we act and books it in the lane of the app the user came
through. Capture and release are ours alone (we created the hold); both are
idempotent by hold id, so a retry after a lost answer is harmless.

Every generation makes two of these calls (hold, then capture or release) and the hold
is on the way to the first token, so they go over the kit's lean keep-alive client
(`services.kit.pool`, the gateway proxy's), not the kit's httpx `ServiceClient`:
measured under bench/generation.py, httpx's connection pool (httpcore scans every
pooled connection, with a `poll()` each, per request) and anyio streams were ~18 % of
the generation process's CPU, and an aiohttp request costs about 4x the pool's
exchange. The rules are the `ServiceClient`'s, whose signed headers it uses: every call
carries an idempotency key, so connection errors, timeouts and 502/503/504 are retried
with the same backoff, and errors come back as the kit error the ledger raised
(`error_from_response`).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson

from services.kit.errors import UpstreamError, UpstreamTimeout
from services.kit.money import milli_to_ku
from services.kit.pool import Pool
from services.kit.service_client import (
    RETRY_STATUSES,
    ServiceClient,
    capture_hold,
    error_from_response,
)

LEDGER = "ledger"
JSON = (b"content-type", b"application/json")


class LedgerCalls:
    """POSTs to the ledger with JSON bodies, as this service, over one keep-alive pool."""

    def __init__(self, client: ServiceClient, *, timeout_seconds: float = 10.0) -> None:
        self.client = client
        self.timeout_seconds = timeout_seconds
        self._pool = Pool(client.url(LEDGER, ""), connect_timeout=timeout_seconds)

    async def aclose(self) -> None:
        self._pool.close()

    async def post(
        self, path: str, body: Any, *, idempotency_key: str, origin: str | None = None
    ) -> Any:
        """The JSON answer; the ledger's error (402, 409, ...) raised as its kit error."""
        data = orjson.dumps(body) if body is not None else b""
        target = path.encode()
        attempts = self.client.retries + 1
        for attempt in range(attempts):
            headers = [
                (name.encode(), value.encode())
                for name, value in self.client.headers(LEDGER, origin=origin).items()
            ]
            headers.append((b"idempotency-key", idempotency_key.encode()))
            if body is not None:
                headers.append(JSON)
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    response = await self._pool.request(
                        "POST", target, headers, data, read_timeout=self.timeout_seconds
                    )
                    try:
                        raw = await response.read()
                    except BaseException:
                        response.close()
                        raise
                    response.release()
                status = response.status
            except TimeoutError:
                if attempt + 1 >= attempts:
                    raise UpstreamTimeout("The ledger service timed out", service=LEDGER) from None
            except OSError:
                if attempt + 1 >= attempts:
                    raise UpstreamError(
                        "The ledger service is unreachable", service=LEDGER
                    ) from None
            else:
                if status not in RETRY_STATUSES or attempt + 1 >= attempts:
                    try:
                        answer = orjson.loads(raw) if raw else None
                    except orjson.JSONDecodeError:
                        answer = None
                    if status >= 400:
                        raise error_from_response(status, answer, LEDGER)
                    return answer
            await asyncio.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover


class Billing:
    def __init__(self, client: ServiceClient, hold_ttl_seconds: int) -> None:
        self.ledger = LedgerCalls(client)
        self.hold_ttl_seconds = hold_ttl_seconds

    async def aclose(self) -> None:
        await self.ledger.aclose()

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
        body = await self.ledger.post(
            "/v1/ledger/holds",
            {
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

    async def settle(self, hold_id: str, cost_milli: int) -> int:
        """Capture what was delivered (the ledger returns the rest), or release it all;
        what was captured.

        A refund's clawback can shrink the hold while the generation runs: what is
        still held is captured then, and that is what the user is charged
        (`services.kit.service_client.capture_hold`)."""
        if cost_milli <= 0:
            await self.release(hold_id)
            return 0

        async def capture(amount: int, key: str) -> None:
            await self.ledger.post(
                f"/v1/ledger/holds/{hold_id}/capture",
                {"amount": milli_to_ku(amount)},
                idempotency_key=key,
            )

        return await capture_hold(
            capture, lambda: self.release(hold_id), cost_milli, f"capture:{hold_id}"
        )

    async def release(self, hold_id: str) -> None:
        await self.ledger.post(
            f"/v1/ledger/holds/{hold_id}/release", None, idempotency_key=f"release:{hold_id}"
        )
