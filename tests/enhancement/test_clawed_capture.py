"""Audit: settlement of a task whose hold a refund's clawback shrank before its capture.

A clawback takes credit back from a lot, and from the active holds drawn from it
(docs/ledger.md "clawbacks"): the hold then holds `amount - clawed`. A capture of the
task's price answers 422 `capture_exceeds_hold` (stored under the capture's key for
good). Before the fix the settlement raised: the task stayed unsettled, retried (and
refused) by every pending-tasks run, while the hold expired back to the user, who kept
the result for free. Now what the hold still holds is captured, under a key of its own,
and the task is settled as charged that; settling again captures nothing more.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from services.enhancement.service import Submission
from services.kit.principal import Principal, outgoing_header
from services.kit.testing.plugin import principal_headers
from services.ledger.verify import verify
from tests.enhancement.conftest import Enh

pytestmark = pytest.mark.e2e

APP = Principal(kind="app", app="imagegene", scopes=frozenset({"enhance", "users:any"}))


async def claw_back_from(enh: Enh, hold_id: str, leave_milli: int) -> None:
    """A refund of the payment behind the hold's lot, through the ledger's admin route:
    all of the lot that is not held, then the hold down to `leave_milli`."""
    [lot] = await enh.sql(
        "SELECT g.source, g.reference, g.remaining_milli, ha.amount_milli AS held"
        " FROM ledger.hold_allocations ha JOIN ledger.grants g ON g.id = ha.grant_id"
        " WHERE ha.hold_id = $1",
        uuid.UUID(hold_id),
    )
    assert lot["reference"] and lot["held"] > leave_milli, lot
    amount = lot["remaining_milli"] + lot["held"] - leave_milli
    [user] = await enh.sql("SELECT user_id FROM ledger.holds WHERE id = $1", uuid.UUID(hold_id))
    admin = principal_headers("app", audience="ledger", app="ops", scopes=("admin",))
    async with httpx.AsyncClient(base_url=enh.suite.urls["ledger"], timeout=10) as ledger:
        r = await ledger.post(
            "/v1/ledger/admin/clawbacks",
            json={
                "user_id": user["user_id"],
                "amount": amount / 1000,
                "source": lot["source"],
                "grant_reference": lot["reference"],
                "reason": "payment refunded (test)",
            },
            headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
        )
    assert r.status_code == 201, r.text
    [hold] = await hold_row(enh, hold_id)
    left = hold["amount_milli"] - hold["clawed_milli"]
    assert (hold["status"], left) == ("active" if leave_milli else "clawed", leave_milli), hold


async def hold_row(enh: Enh, hold_id: str) -> list[dict[str, Any]]:
    return await enh.sql(
        "SELECT status, amount_milli, captured_milli, clawed_milli FROM ledger.holds WHERE id = $1",
        uuid.UUID(hold_id),
    )


async def captures(enh: Enh, user: str) -> list[float]:
    return [t["amount"] for t in await enh.journal(user) if t["kind"] == "capture"]


async def test_a_task_whose_hold_was_clawed_is_charged_what_is_left(enh: Enh) -> None:
    user = await enh.new_user()
    # Priced degraded result (1.5 Ku): the local enhancer completes it, a capture follows.
    async with enh.own_enhancer(enhancement_degraded_price_milli=1500) as e:
        task, _ = await e.submit(
            APP,
            Submission("lighting", "", 0.5, None, user, None, False, upload=enh.images.image),
            origin=outgoing_header(APP, audience="enhancement"),
            idempotency_key=None,
        )
        hold_id = task["hold_id"]
        [hold] = await hold_row(enh, hold_id)
        assert hold["amount_milli"] >= 1500, hold
        # The payment behind the credit is refunded: the hold keeps 0.4 Ku of it.
        await claw_back_from(enh, hold_id, 400)
        assert await e.process(str(task["id"])) == "completed"
        done = await enh.wait(str(task["id"]), within=20)
        assert done["status"] == "completed" and done["settled"] and done["charged"] == 0.4, done
        [hold] = await hold_row(enh, hold_id)
        assert (hold["status"], hold["captured_milli"]) == ("captured", 400), hold
        assert await captures(enh, user) == [0.4]
        balance = await enh.balance(user)
        assert balance["held"] == 0, balance
        assert await verify(enh.suite.env["KU_DATABASE_URL"]) == []
        # Settled again (the pending-tasks run after a crash before `mark_settled`):
        # the same 0.4 Ku answered, nothing captured more, the task settled at it.
        await enh.sql(
            "UPDATE enhancement.tasks SET settled_at = NULL, charged_milli = 0 WHERE id = $1",
            task["id"],
        )
        await e.settle(task["id"])
        await e.run_pending(min_age_seconds=0)
        done = await enh.wait(str(task["id"]), within=20)
        assert done["settled"] and done["charged"] == 0.4, done
        assert await captures(enh, user) == [0.4]
        assert await enh.balance(user) == balance


async def test_a_task_whose_hold_was_clawed_in_full_settles_at_zero(enh: Enh) -> None:
    """docs/enhancement.md: a hold clawed in full (409 `hold_already_clawed`) settles
    the task at what the hold captured: 0."""
    user = await enh.new_user()
    async with enh.own_enhancer(enhancement_degraded_price_milli=1500) as e:
        task, _ = await e.submit(
            APP,
            Submission("lighting", "", 0.5, None, user, None, False, upload=enh.images.image),
            origin=outgoing_header(APP, audience="enhancement"),
            idempotency_key=None,
        )
        await claw_back_from(enh, task["hold_id"], 0)
        assert await e.process(str(task["id"])) == "completed"
        done = await enh.wait(str(task["id"]), within=20)
        assert done["status"] == "completed" and done["settled"] and done["charged"] == 0, done
    assert await captures(enh, user) == []
    assert (await enh.balance(user))["held"] == 0
    assert await verify(enh.suite.env["KU_DATABASE_URL"]) == []
