"""A partner app (an app key without `users:any`) acts only for the users linked to
its app (docs/ledger.md, authority). `users:write` lets it create its users; it must
not let it read any other user's email and name, by id (GET /v1/users/{id}) or by
"creating" an existing user (POST /v1/users answers 200 with the stored user)."""

from __future__ import annotations

import uuid

from tests.auth.helpers import admin, app_with


async def _partner(auth) -> str:
    name = "p" + uuid.uuid4().hex[:10]
    r = await auth.post("/v1/apps", json={"name": name}, headers=admin())
    assert r.status_code == 201, r.text
    return name


async def _victim(auth, new_user_id) -> str:
    user_id = new_user_id()
    r = await auth.post(
        "/v1/users",
        json={"user_id": user_id, "email": "victim@example.com", "username": "Victim"},
        headers=app_with("users:write", "users:any"),  # Penora's own user
    )
    assert r.status_code == 201, r.text
    return user_id


class TestPartnerReadsOnlyLinkedUsers:
    async def test_get_profile_of_an_unlinked_user_is_refused(self, auth, new_user_id):
        partner = await _partner(auth)
        victim = await _victim(auth, new_user_id)
        r = await auth.get(f"/v1/users/{victim}", headers=app_with("users:write", app=partner))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "user_not_linked"
        assert "victim@example.com" not in r.text
        # An unknown id gets the same answer: no oracle of who exists.
        r = await auth.get(
            f"/v1/users/{new_user_id()}", headers=app_with("users:write", app=partner)
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "user_not_linked"

    async def test_creating_an_existing_unlinked_user_reveals_nothing(self, auth, new_user_id):
        partner = await _partner(auth)
        victim = await _victim(auth, new_user_id)
        r = await auth.post(
            "/v1/users",
            json={"user_id": victim, "email": "probe@example.com"},
            headers=app_with("users:write", app=partner),
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["created"] is False and body["user_id"] == victim
        assert body["email"] is None and body["username"] is None, body
        # Nothing was linked or changed by it.
        r = await auth.get(f"/v1/users/{victim}/apps", headers=admin())
        assert partner not in r.json()["apps"]
        r = await auth.get(f"/v1/users/{victim}", headers=admin())
        assert r.json()["email"] == "victim@example.com"

    async def test_linked_users_first_party_and_admins_still_read(self, auth, new_user_id):
        partner = await _partner(auth)
        headers = app_with("users:write", app=partner)
        own = new_user_id()
        r = await auth.post(
            "/v1/users", json={"user_id": own, "email": "own@example.com"}, headers=headers
        )
        assert r.status_code == 201, r.text  # created by its key: linked to it
        r = await auth.get(f"/v1/users/{own}", headers=headers)
        assert r.status_code == 200 and r.json()["email"] == "own@example.com", r.text
        r = await auth.post(
            "/v1/users", json={"user_id": own, "email": "x@example.com"}, headers=headers
        )
        assert r.status_code == 200 and r.json()["email"] == "own@example.com", r.text
        victim = await _victim(auth, new_user_id)
        for who in (app_with("users:write", "users:any"), admin()):
            r = await auth.get(f"/v1/users/{victim}", headers=who)
            assert r.status_code == 200 and r.json()["email"] == "victim@example.com"
        # An admin links the victim to the partner: from then on the partner reads them.
        r = await auth.post(f"/v1/users/{victim}/apps", json={"app": partner}, headers=admin())
        assert r.status_code == 200, r.text
        r = await auth.get(f"/v1/users/{victim}", headers=headers)
        assert r.status_code == 200 and r.json()["email"] == "victim@example.com"
