"""The worker reconciles on its own: a real `python -m services.worker` process, its
reconcile interval set to 2 s, finds a payment nobody reported and grants it once."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from services.kit.runner import Suite
from tests.ledger.billing.helpers import grants, paid_order, payments
from tests.ledger.helpers import balance

pytestmark = pytest.mark.e2e


class TestScheduledReconcile:
    async def test_a_payment_whose_webhook_never_came_is_granted_by_the_worker(
        self, ledger, razorpay, buyer
    ):
        user = await buyer()
        _, payment = await paid_order(ledger, razorpay, user, "topup_25")
        assert await grants(ledger, user) == []
        env = {
            **os.environ,  # the razorpay fixture pointed KU_RAZORPAY_* at the fake
            "KU_WORKER_SERVICES": "ledger",
            "KU_BILLING_RECONCILE_SECONDS": "2",
        }
        async with Suite(env, only=["worker"], free_ports=True, quiet=True, migrate=False) as suite:
            worker = suite.urls["worker"]
            async with httpx.AsyncClient(timeout=5) as client:
                health = (await client.get(worker + "/health")).json()
                (job,) = [j for j in health["schedule"]["cron"] if j["name"].endswith("reconcile")]
                assert job["name"] == "billing.reconcile"
                assert job["second"] == list(range(0, 60, 2))
                deadline = time.monotonic() + 40
                granted: list = []
                while time.monotonic() < deadline:
                    granted = await grants(ledger, user)
                    if granted:
                        break
                    await asyncio.sleep(0.5)
                assert len(granted) == 1, suite.logs("worker")
                # Later runs find it granted and change nothing. (A run may fail on a busy
                # shared database; the job fails loudly and the next run retries.)
                runs = (await client.get(worker + "/health")).json()["jobs"]["billing.reconcile"]
                while time.monotonic() < deadline + 20:
                    stats = (await client.get(worker + "/health")).json()["jobs"]
                    stats = stats["billing.reconcile"]
                    if stats["runs"] > runs["runs"] and stats["last_ok"]:
                        break
                    await asyncio.sleep(0.5)
        assert stats["last_ok"] is True and stats["runs"] >= 2, (stats, suite.logs("worker"))
        assert len(await grants(ledger, user)) == 1
        assert (await balance(ledger, user))["available"] == 25
        (row,) = await payments(ledger, user)
        assert row["payment_id"] == payment["id"] and row["granted"] == 25
        assert "GET /v1/payments" in razorpay.calls
