"""Seed 004's routes for old clients, progress events, monthly allowances."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from services.enhancement.service import next_period_start, period_of
from tests.enhancement.conftest import PROCESS_TOKEN, Enh
from tests.enhancement.test_flow import kinds, submit

pytestmark = pytest.mark.e2e


class TestSeedRoutes:
    async def test_enhance_image_submit_status_and_list(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        token = enh.signing.token(user, scope="enhance", app="imagegene")
        async with enh.client(token=token) as gw:
            r = await gw.post(
                "/api/enhance-image",
                json={
                    "inputImageUrl": f"{enh.images.url}/image.png",
                    "enhancementType": "lighting",
                    "prompt": "warm golden hour lighting",
                    "strength": 0.8,
                    "moodboardId": "mb-1",
                },
            )
            assert r.status_code == 202, r.text
            task_id = r.json()["taskId"]
            assert r.json()["success"] is True
            for _ in range(200):
                r = await gw.get("/api/enhance-image", params={"taskId": task_id})
                assert r.status_code == 200, r.text
                task = r.json()["task"]
                if task["status"] == "completed":
                    break
                await asyncio.sleep(0.2)
            assert task["status"] == "completed" and task["resultUrl"]
            assert task["moodboardId"] == "mb-1" and task["errorMessage"] is None
            assert (await gw.get(task["resultUrl"])).status_code == 200
            r = await gw.get("/api/enhance-image", params={"limit": 10})
            assert [t["id"] for t in r.json()["tasks"]] == [task_id]
        await enh.wait(task_id)
        assert kinds(await enh.journal(user)) == ["capture", "reserve"]

    async def test_seed_error_bodies(self, enh: Enh):
        user = await enh.new_user()
        token = enh.signing.token(user, scope="enhance", app="imagegene")
        async with enh.client(token=token) as gw:
            r = await gw.post(
                "/api/enhance-image",
                json={"inputImageUrl": "http://169.254.169.254/", "enhancementType": "mood"},
            )
            assert r.status_code == 422
            assert r.json()["success"] is False and r.json()["code"] == "unsafe_url"
            r = await gw.get("/api/enhance-image", params={"taskId": "nope"})
            assert r.status_code == 404 and r.json()["success"] is False
            r = await gw.get("/api/admin/credit-stats")  # a user is not an admin
            assert r.status_code == 403 and r.json()["success"] is False
        async with enh.client() as gw:
            r = await gw.post("/api/enhance-image", json={"inputImageUrl": "x"})
            assert r.status_code == 401 and r.json()["success"] is False

    async def test_admin_stats_and_refill(self, enh: Enh):
        async with enh.client(enh.keys["admin"]) as gw:
            before = (await gw.get("/api/admin/credit-stats")).json()
            assert before["success"] is True
            assert before["budget"]["pool_budget_percent"] == 80
            pools = {p["provider"]: p for p in before["creditPools"]}
            r = await gw.post(
                "/api/admin/refill-credits",
                json={"provider": "nanobanan", "amount": 500, "reference": "seed-refill"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["newBalance"] == pools["nanobanana"]["balance"] + 500
            again = await gw.post(
                "/api/admin/refill-credits",
                json={"provider": "nanobanan", "amount": 500, "reference": "seed-refill"},
            )
            assert again.json()["newBalance"] == r.json()["newBalance"]
            r = await gw.post("/api/admin/refill-credits", json={"provider": "x", "amount": 5})
            assert r.status_code == 404 and r.json()["success"] is False
        async with enh.client(enh.keys["imagegene"]) as gw:  # not admin
            r = await gw.post("/api/admin/refill-credits", json={"provider": "fal", "amount": 5})
            assert r.status_code == 403

    async def test_merged_openapi_lists_both_apis(self, enh: Enh):
        async with enh.client() as gw:
            paths = (await gw.get("/openapi.json")).json()["paths"]
        assert "/v1/enhancement/tasks" in paths and "/v1/enhancement/tasks/{task_id}" in paths
        assert "/api/enhance-image" in paths and "/api/admin/refill-credits" in paths

    async def test_process_tasks_needs_the_token(self, enh: Enh):
        async with httpx.AsyncClient(base_url=enh.gateway, timeout=30) as gw:
            r = await gw.post("/api/background/process-tasks")
            assert r.status_code == 401 and r.json()["success"] is False
            r = await gw.post(
                "/api/background/process-tasks", headers={"Authorization": "Bearer wrong"}
            )
            assert r.status_code == 401
            r = await gw.post(
                "/api/background/process-tasks",
                headers={"Authorization": f"Bearer {PROCESS_TOKEN}"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["success"] is True and "enqueued" in r.json()["processed"]


class TestProgressEvents:
    async def test_task_events_reach_the_users_stream(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        token = enh.signing.token(user, scope="enhance ledger:read", app="imagegene")
        seen: list[dict] = []

        async def listen() -> None:
            async with (
                enh.client(token=token) as gw,
                gw.stream("GET", "/v1/events", timeout=60) as stream,
            ):
                event = None
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "enhancement.task.updated":
                        data = orjson.loads(line[6:])
                        seen.append(data)
                        if data["status"] == "completed":
                            return

        listener = asyncio.create_task(listen())
        await asyncio.sleep(1.0)  # subscribed before the task starts
        task = await submit(enh, user, key=None)
        await asyncio.wait_for(listener, 60)
        assert {e["task_id"] for e in seen} == {task["id"]}
        assert seen[-1]["status"] == "completed" and seen[-1]["user_id"] == user
        assert "processing" in [e["status"] for e in seen]


async def ledger_allowances(enh: Enh, user: str) -> dict[str, tuple[int, int]]:
    """The user's enhancement allowances in the ledger: period -> (granted, used)."""
    rows = await enh.sql(
        "SELECT period, granted, used FROM ledger.allowances"
        " WHERE user_id = $1 AND kind = 'enhancement'",
        user,
    )
    return {r["period"]: (r["granted"], r["used"]) for r in rows}


async def allowance_entries(enh: Enh, user: str) -> list[str]:
    rows = await enh.sql(
        "SELECT entry FROM ledger.allowance_entries WHERE user_id = $1 ORDER BY id", user
    )
    return [r["entry"] for r in rows]


class TestAllowance:
    async def test_plus_user_pays_for_the_eleventh(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        before = await enh.balance(user)
        async with enh.client(enh.keys["admin"]) as gw:
            r = await gw.put(f"/v1/enhancement/tiers/{user}", json={"tier": "plus"})
            assert r.status_code == 200 and r.json()["remaining"] == 10
            assert r.json()["granted"] == 0  # granted in the ledger at the first use
        tasks = [await submit(enh, user) for _ in range(11)]
        assert [t["price"] for t in tasks] == [0] * 10 + [2]
        assert [t["included"] for t in tasks] == [True] * 10 + [False]
        for t in tasks:
            await enh.wait(t["id"])
        # The ten included ones are the month's allowance in the ledger: one grant of 10
        # units, ten draws, each confirmed once its task completed; the eleventh's draw
        # was refused and recorded nothing. No Ku moved for them: one hold, one capture.
        period = period_of(datetime.now(UTC))
        assert await ledger_allowances(enh, user) == {period: (10, 10)}
        entries = await allowance_entries(enh, user)
        assert entries[0] == "grant" and sorted(entries[1:]) == ["confirm"] * 10 + ["draw"] * 10
        assert kinds(await enh.journal(user)) == ["capture", "reserve"]
        after = await enh.balance(user)
        assert before["available"] - after["available"] == 2 and after["held"] == 0
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.get("/v1/enhancement/allowance", params={"user_id": user})
            assert r.json()["used"] == 10 and r.json()["remaining"] == 0
            # The same allowance, read from the ledger by the app.
            r = await gw.get("/v1/ledger/allowances", params={"user_id": user})
            assert [(i["kind"], i["granted"], i["used"]) for i in r.json()["items"]] == [
                ("enhancement", 10, 10)
            ]
        async with enh.client(enh.keys["admin"]) as gw:
            r = await gw.get("/v1/enhancement/alerts", params={"kind": "allowance_high"})
            assert [a["subject"] for a in r.json()["items"]].count(user) == 1

        # The 1st of next month: the monthly job grants 10 again in the ledger; this
        # month's grant expires there at the month's end (nothing of it carries over).
        first = next_period_start(datetime.now(UTC))
        async with enh.own_enhancer() as e:
            assert (await e.allowance(user, now=first))["remaining"] == 10
            await e.monthly_reset(now=first)
            fresh = await e.allowance(user, now=first)
            assert (fresh["included"], fresh["granted"], fresh["used"]) == (10, 10, 0)
            assert fresh["remaining"] == 10
            assert (await e.allowance(user))["used"] == 10  # this month's is untouched
        assert await ledger_allowances(enh, user) == {period: (10, 10), period_of(first): (10, 0)}
        ends = await enh.sql(
            "SELECT period, expires_at FROM ledger.allowances WHERE user_id = $1", user
        )
        assert {r["period"]: r["expires_at"] for r in ends}[period] == first

    async def test_unused_allowance_does_not_carry_over(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        async with enh.client(enh.keys["admin"]) as gw:
            await gw.put(f"/v1/enhancement/tiers/{user}", json={"tier": "pro"})
            r = await gw.put(f"/v1/enhancement/tiers/{user}", json={"tier": "gold"})
            assert r.status_code == 422
        task = await submit(enh, user)
        assert task["included"] is True
        await enh.wait(task["id"])
        period = period_of(datetime.now(UTC))
        first = next_period_start(datetime.now(UTC))
        async with enh.own_enhancer() as e:
            assert (await e.allowance(user))["remaining"] == 24
            await e.monthly_reset(now=first)
            nxt = await e.allowance(user, now=first)
            assert nxt["included"] == 25 and nxt["remaining"] == 25  # not 49
        # In the ledger: next month is granted 25; this month's 24 unused expire with it.
        assert await ledger_allowances(enh, user) == {period: (25, 1), period_of(first): (25, 0)}
        await enh.sql(
            "UPDATE ledger.allowances SET expires_at = clock_timestamp() - interval '1 second'"
            " WHERE user_id = $1 AND period = $2",
            user,
            period,
        )  # the month ends (its end moved into the past, as time passing would)
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.get("/v1/ledger/allowances", params={"user_id": user, "period": period})
            [ended] = r.json()["items"]
            assert ended["expired"] is True and ended["remaining"] == 0
        late = await submit(enh, user)  # this month's allowance is gone: Ku
        assert late["included"] is False and late["price"] == 2
        await enh.wait(late["id"])

    async def test_degraded_result_gives_the_included_enhancement_back(self, enh: Enh):
        enh.reset_providers(nanobanana="down", kie="down", fal="fail", google="fail")
        user = await enh.new_user()
        async with enh.client(enh.keys["admin"]) as gw:
            await gw.put(f"/v1/enhancement/tiers/{user}", json={"tier": "plus"})
        task = await enh.wait((await submit(enh, user))["id"])
        assert task["included"] is True and task["degraded"] is True
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.get("/v1/enhancement/allowance", params={"user_id": user})
        assert r.json()["used"] == 0 and r.json()["remaining"] == 10
        # Drawn, then returned in the ledger (not confirmed); no Ku moved.
        assert await allowance_entries(enh, user) == ["grant", "draw", "return"]
        assert await ledger_allowances(enh, user) == {period_of(datetime.now(UTC)): (10, 0)}
        assert kinds(await enh.journal(user)) == []
        enh.reset_providers()
