from __future__ import annotations

import asyncio

from tests.workspace.helpers import admin, app_key, b64, png, save, saved, storage

LIMIT = 1_048_576
KB100 = 100 * 1024


class TestConcurrentSaves:
    async def test_20_concurrent_100kb_saves_never_pass_1mb(self, workspace, new_user_id):
        uid = new_user_id()
        results = await asyncio.gather(
            *(save(workspace, uid, title=f"T{i:02d}", content="x" * KB100) for i in range(20))
        )
        statuses = [r.status_code for r in results]
        stored = [r.json() for r in results if r.status_code == 201]
        # each costs 102,403 bytes (content + 3-byte title): exactly 10 fit in 1,048,576
        assert statuses.count(201) == 10, statuses
        assert statuses.count(413) == 10, statuses
        for r in results:
            if r.status_code == 413:
                err = r.json()["error"]
                assert err["code"] == "storage_limit_exceeded"
                assert err["detail"]["needed_bytes"] == KB100 + 3
                assert err["detail"]["available_bytes"] < KB100 + 3
        stats = await storage(workspace, uid)
        total = sum(p["size_bytes"] for p in stored)
        assert stats["used_bytes"] == total <= LIMIT
        assert stats["project_count"] == 10
        assert stats["by_app"] == [{"app_source": "penora", "bytes": total, "count": 10}]

    async def test_concurrent_updates_cannot_pass_the_limit(self, workspace, new_user_id):
        uid = new_user_id()
        projects = [await saved(workspace, uid, title=f"U{i}", content="s") for i in range(6)]
        results = await asyncio.gather(
            *(
                workspace.patch(
                    f"/v1/workspace/projects/{p['code']}",
                    json={"content": "y" * 200_000},
                    headers=app_key(),
                )
                for p in projects
            )
        )
        statuses = sorted(r.status_code for r in results)
        # 5 * (200,000 + 2) + 1 * 3 fits; a 6th 200 KB would not
        assert statuses == [200] * 5 + [413], statuses
        stats = await storage(workspace, uid)
        assert stats["used_bytes"] == 5 * 200_002 + 3 <= LIMIT


class TestLimit:
    async def test_exact_fit_is_allowed_one_more_byte_is_not(self, workspace, new_user_id):
        uid = new_user_id()
        r = await save(workspace, uid, title="A", content="a" * (LIMIT - 1))
        assert r.status_code == 201, r.text
        assert (await storage(workspace, uid))["available_bytes"] == 0
        r = await save(workspace, uid, title="B", content="")
        assert r.status_code == 413
        assert r.json()["error"]["detail"] == {
            "needed_bytes": 1,
            "available_bytes": 0,
            "used_bytes": LIMIT,
            "limit_bytes": LIMIT,
        }
        assert "1 more bytes" in r.json()["error"]["message"]

    async def test_delete_frees_space_at_once(self, workspace, new_user_id):
        uid = new_user_id()
        big = await saved(workspace, uid, title="big", content="b" * 900_000)
        assert (await save(workspace, uid, content="c" * 300_000)).status_code == 413
        r = await workspace.delete(f"/v1/workspace/projects/{big['code']}", headers=app_key())
        assert r.status_code == 200
        assert (await save(workspace, uid, content="c" * 300_000)).status_code == 201

    async def test_growing_update_past_the_limit_is_413_and_changes_nothing(
        self, workspace, new_user_id
    ):
        uid = new_user_id()
        p = await saved(workspace, uid, title="grow", content="g" * 1000)
        r = await workspace.patch(
            f"/v1/workspace/projects/{p['code']}",
            json={"title": "renamed", "content": "g" * LIMIT},
            headers=app_key(),
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "storage_limit_exceeded"
        got = (await workspace.get(f"/v1/workspace/projects/{p['code']}", headers=admin())).json()
        assert got["title"] == "grow" and got["content"] == "g" * 1000
        assert (await storage(workspace, uid))["used_bytes"] == p["size_bytes"]

    async def test_images_count_their_decoded_size(self, workspace, new_user_id):
        uid = new_user_id()
        image = png(300, 300, noise=True)  # about 270 KB as PNG, 360 KB as base64
        assert 250_000 < len(image) < 300_000
        made = [await save(workspace, uid, title="i", content=b64(image)) for _ in range(4)]
        assert [r.status_code for r in made] == [201, 201, 201, 413]
        assert (await storage(workspace, uid))["used_bytes"] == 3 * (len(image) + 1)


class TestAdminQuota:
    async def test_admin_raises_and_resets_a_users_limit(self, workspace, new_user_id):
        uid = new_user_id()
        r = await workspace.put(
            f"/v1/workspace/quotas/{uid}", json={"limit_bytes": 3 * LIMIT}, headers=admin()
        )
        assert r.status_code == 200 and r.json()["limit_bytes"] == 3 * LIMIT
        assert (await save(workspace, uid, title="T", content="z" * 2 * LIMIT)).status_code == 201
        stats = await storage(workspace, uid)
        assert stats["limit_bytes"] == 3 * LIMIT and stats["available_bytes"] == LIMIT - 1
        r = await workspace.put(
            f"/v1/workspace/quotas/{uid}", json={"limit_bytes": None}, headers=admin()
        )
        assert r.status_code == 200 and r.json()["limit_bytes"] == LIMIT
        # over the default now: nothing is deleted, but nothing more fits
        assert r.json()["used_bytes"] == 2 * LIMIT + 1 and r.json()["available_bytes"] == 0
        assert (await save(workspace, uid, content="more")).status_code == 413

    async def test_a_lower_limit_applies_to_the_next_save(self, workspace, new_user_id):
        uid = new_user_id()
        r = await workspace.put(
            f"/v1/workspace/quotas/{uid}", json={"limit_bytes": 100}, headers=admin()
        )
        assert r.status_code == 200
        assert (await save(workspace, uid, title="t", content="x" * 99)).status_code == 201
        assert (await save(workspace, uid, title="t", content="")).status_code == 413

    async def test_quota_needs_admin(self, workspace, new_user_id):
        uid = new_user_id()
        r = await workspace.put(
            f"/v1/workspace/quotas/{uid}", json={"limit_bytes": 10 * LIMIT}, headers=app_key()
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert (await storage(workspace, uid))["limit_bytes"] == LIMIT
        r = await workspace.put(
            f"/v1/workspace/quotas/{uid}", json={"limit_bytes": -1}, headers=admin()
        )
        assert r.status_code == 422
