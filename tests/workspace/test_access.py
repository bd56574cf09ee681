"""A user token never reaches another user's projects, whichever way it asks."""

from __future__ import annotations

import pytest

from tests.workspace.helpers import admin, app_key, saved, storage, user


@pytest.fixture
async def victim(workspace, new_user_id):
    uid = new_user_id()
    project = await saved(workspace, uid, title="Secret diary", content="my secret text")
    return uid, project


def _leaks(response, secret: str = "Secret diary") -> bool:
    return secret in response.text or "my secret text" in response.text


class TestCrossUser:
    async def test_read_by_code(self, workspace, victim, new_user_id):
        uid, project = victim
        attacker = user(new_user_id())
        for path in ("", "/content", "/export?format=txt", "/export?format=pdf"):
            r = await workspace.get(
                f"/v1/workspace/projects/{project['code']}{path}", headers=attacker
            )
            assert r.status_code == 404, (path, r.status_code)
            assert r.json()["error"]["code"] == "project_not_found" and not _leaks(r)

    async def test_read_by_naming_the_owner(self, workspace, victim, new_user_id):
        uid, project = victim
        r = await workspace.get(
            f"/v1/workspace/projects/{project['code']}",
            params={"user_id": uid},
            headers=user(new_user_id()),
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_user"
        assert not _leaks(r)

    async def test_list_and_storage_of_another_user(self, workspace, victim, new_user_id):
        uid, _ = victim
        attacker = new_user_id()
        r = await workspace.get(
            "/v1/workspace/projects", params={"user_id": uid}, headers=user(attacker)
        )
        assert r.status_code == 403 and not _leaks(r)
        r = await workspace.get(
            "/v1/workspace/storage", params={"user_id": uid}, headers=user(attacker)
        )
        assert r.status_code == 403 and "used_bytes" not in r.text
        # without user_id a user token lists its own (empty) workspace
        r = await workspace.get("/v1/workspace/projects", headers=user(attacker))
        assert r.status_code == 200 and r.json()["items"] == []

    async def test_update_and_delete(self, workspace, victim, new_user_id):
        uid, project = victim
        attacker = user(new_user_id())
        r = await workspace.patch(
            f"/v1/workspace/projects/{project['code']}", json={"title": "pwned"}, headers=attacker
        )
        assert r.status_code == 404 and not _leaks(r)
        r = await workspace.delete(f"/v1/workspace/projects/{project['code']}", headers=attacker)
        assert r.status_code == 404
        r = await workspace.delete(
            f"/v1/workspace/projects/{project['code']}", params={"user_id": uid}, headers=attacker
        )
        assert r.status_code == 403
        got = await workspace.get(f"/v1/workspace/projects/{project['code']}", headers=admin())
        assert got.status_code == 200 and got.json()["title"] == "Secret diary"
        assert (await storage(workspace, uid))["project_count"] == 1

    async def test_create_for_another_user(self, workspace, victim, new_user_id):
        uid, _ = victim
        r = await workspace.post(
            "/v1/workspace/projects",
            json={"user_id": uid, "title": "x", "content": "y"},
            headers=user(new_user_id()),
        )
        assert r.status_code == 403
        assert (await storage(workspace, uid))["project_count"] == 1

    async def test_owner_token_has_full_access(self, workspace, victim):
        uid, project = victim
        me = user(uid)
        r = await workspace.get(f"/v1/workspace/projects/{project['code']}", headers=me)
        assert r.status_code == 200 and r.json()["content"] == "my secret text"
        r = await workspace.get("/v1/workspace/projects", headers=me)
        assert [p["code"] for p in r.json()["items"]] == [project["code"]]
        r = await workspace.delete(f"/v1/workspace/projects/{project['code']}", headers=me)
        assert r.status_code == 200

    async def test_app_key_naming_the_wrong_owner_gets_404(self, workspace, victim, new_user_id):
        _, project = victim
        r = await workspace.get(
            f"/v1/workspace/projects/{project['code']}",
            params={"user_id": new_user_id()},
            headers=app_key(),
        )
        assert r.status_code == 404 and not _leaks(r)


class TestScopes:
    async def test_read_scope_cannot_write(self, workspace, victim):
        uid, project = victim
        reader = app_key(scopes=("workspace:read",))
        assert (
            await workspace.get(f"/v1/workspace/projects/{project['code']}", headers=reader)
        ).status_code == 200
        r = await workspace.delete(f"/v1/workspace/projects/{project['code']}", headers=reader)
        assert r.status_code == 403 and r.json()["error"]["code"] == "missing_scope"
        r = await workspace.post(
            "/v1/workspace/projects",
            json={"user_id": uid, "title": "t", "content": "c"},
            headers=reader,
        )
        assert r.status_code == 403
        assert (await storage(workspace, uid))["project_count"] == 1

    async def test_other_scopes_cannot_read(self, workspace, victim):
        _, project = victim
        r = await workspace.get(
            f"/v1/workspace/projects/{project['code']}", headers=app_key(scopes=("ledger:read",))
        )
        assert r.status_code == 403 and not _leaks(r)

    async def test_no_principal_is_401(self, workspace, victim):
        _, project = victim
        r = await workspace.get(f"/v1/workspace/projects/{project['code']}")
        assert r.status_code == 401 and not _leaks(r)
