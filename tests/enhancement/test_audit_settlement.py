"""Audit: settlement of a task whose hold is no longer there to capture.

A completed task's hold can be gone by the time it is captured: its TTL passed (the
ledger was unreachable at capture time for longer than `HOLD_TTL_SECONDS`, or the
worker was down) and the ledger's sweep gave it back. The ledger then refuses the
capture for good (409 `hold_expired`). The user got the credit back, so the task must
settle as charged 0 (never charged later, nothing left unsettled), and one such task
must not stop the pending-tasks job from settling and re-enqueueing the others.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from services.enhancement.service import Submission
from services.kit.principal import Principal, outgoing_header
from services.ledger.tasks import expire_holds
from tests.enhancement.conftest import Enh

pytestmark = pytest.mark.e2e

APP = Principal(kind="app", app="imagegene", scopes=frozenset({"enhance", "users:any"}))


async def expire_hold(enh: Enh, hold_id: str) -> None:
    """The hold's TTL ran out and the ledger's sweep ran (as its worker does)."""
    await enh.sql(
        "UPDATE ledger.holds SET expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(hold_id),
    )
    pool = await asyncpg.create_pool(enh.suite.env["KU_DATABASE_URL"], min_size=1, max_size=1)
    try:
        await expire_holds(pool)
    finally:
        await pool.close()
    [row] = await enh.sql("SELECT status FROM ledger.holds WHERE id = $1", uuid.UUID(hold_id))
    assert row["status"] == "expired"


async def test_capture_of_an_expired_hold_settles_at_zero_and_blocks_nothing(enh: Enh) -> None:
    user = await enh.new_user()
    before = await enh.balance(user)
    # Priced degraded result (1.5 Ku): the local enhancer completes it, a capture follows.
    async with enh.own_enhancer(enhancement_degraded_price_milli=1500) as e:
        submitted = []
        for _ in range(2):
            task, _ = await e.submit(
                APP,
                Submission("lighting", "", 0.5, None, user, None, False, upload=enh.images.image),
                origin=outgoing_header(APP, audience="enhancement"),
                idempotency_key=None,
            )
            submitted.append(task)
        first, second = submitted
        await expire_hold(enh, first["hold_id"])
        # The first completes after its hold is gone: settled, charged nothing.
        assert await e.process(str(first["id"])) == "completed"
        done = await enh.wait(str(first["id"]))
        assert done["status"] == "completed" and done["settled"] and done["charged"] == 0, done
        # The second completes normally and is charged its degraded price.
        assert await e.process(str(second["id"])) == "completed"
        done = await enh.wait(str(second["id"]))
        assert done["charged"] == 1.5, done
        # Nothing unsettled is left behind for the pending-tasks job to trip over.
        await e.run_pending()
    after = await enh.balance(user)
    assert before["available"] - after["available"] == 1.5 and after["held"] == 0


async def test_one_unsettleable_task_does_not_stop_the_pending_job(enh: Enh) -> None:
    """A task whose settlement keeps failing (here: its hold belongs to nobody the
    service can capture) is logged and skipped; the tasks after it still settle."""
    user = await enh.new_user()
    async with enh.own_enhancer(enhancement_degraded_price_milli=1500) as e:
        tasks = []
        for _ in range(2):
            task, _ = await e.submit(
                APP,
                Submission("lighting", "", 0.5, None, user, None, False, upload=enh.images.image),
                origin=outgoing_header(APP, audience="enhancement"),
                idempotency_key=None,
            )
            tasks.append(task)
        poisoned, healthy = tasks
        # Finished (completed) but unsettled, the poisoned one first in line; its hold id
        # points at no hold (a row damaged by hand, a hold purged): 404 from the ledger.
        for task, hold in ((poisoned, str(uuid.uuid4())), (healthy, healthy["hold_id"])):
            await enh.sql(
                "UPDATE enhancement.tasks SET status = 'completed', degraded = true,"
                " provider = 'local', completed_at = now(), hold_id = $2 WHERE id = $1",
                task["id"],
                hold,
            )
        await enh.sql(
            "UPDATE enhancement.tasks SET completed_at = now() - interval '1 hour' WHERE id = $1",
            poisoned["id"],
        )
        await e.run_pending(min_age_seconds=0)
        done = await enh.wait(str(healthy["id"]))
        assert done["settled"] and done["charged"] == 1.5, done


async def test_an_expired_draw_is_settled_without_it(enh: Enh) -> None:
    """docs/enhancement.md: "A draw whose TTL passed before settlement came back to the
    user (409 `draw_expired`, logged): the task is settled without it." A Plus user's
    included task completes on a provider after its draw expired: settled, nothing
    charged, the unit back with the user."""
    enh.reset_providers()
    user = await enh.new_user()
    async with enh.client(enh.keys["admin"]) as gw:
        r = await gw.put(f"/v1/enhancement/tiers/{user}", json={"tier": "plus"})
        assert r.status_code == 200, r.text
    fake = enh.providers["nanobanana"]
    async with enh.own_enhancer(
        enhancement_nanobanana_url=fake.url,
        enhancement_nanobanana_api_key="key-nanobanana",
        enhancement_fetch_allow_origins=",".join([enh.images.url, fake.url]),
        enhancement_poll_interval_seconds=0.05,
    ) as e:
        task, _ = await e.submit(
            APP,
            Submission("lighting", "", 0.5, None, user, None, False, upload=enh.images.image),
            origin=outgoing_header(APP, audience="enhancement"),
            idempotency_key=None,
        )
        assert task["allowance_period"] and task["hold_id"] is None
        reference = f"enhancement:{task['id']}"
        await enh.sql(
            "UPDATE ledger.allowance_draws SET expires_at = now() - interval '1 second'"
            " WHERE reference = $1",
            reference,
        )
        pool = await asyncpg.create_pool(enh.suite.env["KU_DATABASE_URL"], min_size=1, max_size=1)
        try:
            await expire_holds(pool)  # the ledger's sweep: holds and draws
        finally:
            await pool.close()
        assert await e.process(str(task["id"])) in ("completed", "skipped")
    done = await enh.wait(str(task["id"]))
    assert done["status"] == "completed" and done["settled"] and done["charged"] == 0, done
    assert done["degraded"] is False  # completed on a provider: its draw was to be confirmed
    [draw] = await enh.sql(
        "SELECT status FROM ledger.allowance_draws WHERE reference = $1", reference
    )
    assert draw["status"] == "expired"
    [allowance] = await enh.sql(
        "SELECT used FROM ledger.allowances WHERE user_id = $1 AND kind = 'enhancement'", user
    )
    assert allowance["used"] == 0
