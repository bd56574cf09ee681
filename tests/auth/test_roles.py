"""The admin role of SSO accounts: given and taken by admins with a reason, carried into
the user's tokens as the `admin` scope at sign-in and refresh."""

from __future__ import annotations

from jose import jwt
from sqlalchemy import text

from services.auth.config import DEFAULT_USER_SCOPES
from tests.auth.helpers import admin, app_with, claims, hs_token, user

REASON = {"reason": "on-call operator, ticket OPS-112"}


async def login(auth, user_id: str) -> dict:
    r = await auth.post("/v1/auth/sso", json={"token": hs_token(claims(user_id))})
    assert r.status_code == 200, r.text
    return r.json()


def scopes(pair: dict) -> set[str]:
    token_scopes = set(jwt.get_unverified_claims(pair["access_token"])["scope"].split())
    assert token_scopes == set(pair["scope"].split())
    return token_scopes


class TestAdminRole:
    async def test_granted_role_reaches_the_next_token_and_revoke_removes_it(
        self, auth, new_user_id, sessions
    ):
        user_id = new_user_id()
        first = await login(auth, user_id)
        assert scopes(first) == set(DEFAULT_USER_SCOPES.split())

        r = await auth.put(f"/v1/users/{user_id}/roles/admin", json=REASON, headers=admin())
        assert r.status_code == 200 and r.json() == {"user_id": user_id, "roles": ["admin"]}
        again = await auth.put(f"/v1/users/{user_id}/roles/admin", json=REASON, headers=admin())
        assert again.json()["roles"] == ["admin"]  # idempotent
        refreshed = await auth.post(
            "/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
        )
        assert refreshed.status_code == 200
        assert scopes(refreshed.json()) == {*DEFAULT_USER_SCOPES.split(), "admin"}
        assert "admin" in scopes(await login(auth, user_id))

        r = await auth.get(f"/v1/users/{user_id}/roles", headers=user(user_id))
        assert r.status_code == 200 and r.json()["roles"] == ["admin"]
        taken = {"reason": "left the on-call rota"}
        r = await auth.post(f"/v1/users/{user_id}/roles/admin/revoke", json=taken, headers=admin())
        assert r.status_code == 200 and r.json()["roles"] == []
        assert "admin" not in scopes(await login(auth, user_id))
        async with sessions() as s:
            row = (
                await s.execute(
                    text(
                        "SELECT granted_by, reason, revoked_by, revoke_reason"
                        " FROM auth.user_roles WHERE user_id = :u"
                    ),
                    {"u": user_id},
                )
            ).one()
        assert row.granted_by == "app:ops" and row.reason == REASON["reason"]
        assert row.revoked_by == "app:ops" and row.revoke_reason == "left the on-call rota"

        # Given again after a revocation: held again.
        r = await auth.put(f"/v1/users/{user_id}/roles/admin", json=REASON, headers=admin())
        assert r.json()["roles"] == ["admin"]

    async def test_only_admins_give_roles_and_with_a_reason(self, auth, new_user_id):
        user_id = new_user_id()
        await login(auth, user_id)
        path = f"/v1/users/{user_id}/roles/admin"
        for headers in (user(user_id), app_with("users:write", "users:any")):
            r = await auth.put(path, json=REASON, headers=headers)
            assert r.status_code == 403, r.text
        assert (await auth.put(path, json={}, headers=admin())).status_code == 422
        assert (await auth.put(path, json={"reason": ""}, headers=admin())).status_code == 422
        r = await auth.put(f"/v1/users/{user_id}/roles/owner", json=REASON, headers=admin())
        assert r.status_code == 422  # only `admin` exists
        r = await auth.put(f"/v1/users/{new_user_id()}/roles/admin", json=REASON, headers=admin())
        assert r.status_code == 404
        other = new_user_id()
        r = await auth.get(f"/v1/users/{other}/roles", headers=user(user_id))
        assert r.status_code == 403
