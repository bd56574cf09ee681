from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import text

from services.auth.users.service import users
from tests.auth.helpers import admin, app_with, gateway, stream_event, user


async def count_events(redis, stream: str, user_id: str) -> int:
    entries = await redis.xrange(stream)
    return sum(
        1
        for _, f in entries
        if f[b"topic"] == b"user.created" and user_id.encode() in f[b"payload"]
    )


async def penora_registered(auth) -> None:
    """The app `app_with()`'s keys belong to, registered as every key's app is: a key
    without `users:any` reads only the users linked to its app (its own creations)."""
    r = await auth.post("/v1/apps", json={"name": "penora"}, headers=admin())
    assert r.status_code in (201, 409), r.text


class TestCreateUser:
    async def test_21_digit_id_round_trips_exactly(self, auth, new_user_id):
        await penora_registered(auth)
        user_id = new_user_id()
        assert len(user_id) == 21
        r = await auth.post(
            "/v1/users",
            json={"user_id": user_id, "email": "a@example.com", "username": "Asha"},
            headers=app_with("users:write"),
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["user_id"] == user_id and body["created"] is True
        assert body["email"] == "a@example.com" and body["username"] == "Asha"
        r = await auth.get(f"/v1/users/{user_id}", headers=app_with("users:write"))
        assert r.status_code == 200 and r.json()["user_id"] == user_id

    async def test_numeric_json_id_keeps_every_digit(self, auth, sessions):
        user_id = "987654321098765432109"
        r = await auth.post(
            "/v1/users",
            content=f'{{"user_id": {user_id}, "email": "n@example.com"}}',
            headers={**app_with("users:write"), "content-type": "application/json"},
        )
        assert r.status_code in (200, 201), r.text
        assert r.json()["user_id"] == user_id
        async with sessions() as s:
            stored = await s.scalar(text("SELECT id FROM auth.users WHERE id = :u"), {"u": user_id})
        assert stored == user_id

    async def test_existing_id_is_returned_unchanged_with_200(
        self, auth, new_user_id, redis, auth_stream
    ):
        await penora_registered(auth)
        user_id = new_user_id()
        first = await auth.post(
            "/v1/users",
            json={"user_id": user_id, "email": "first@example.com", "username": "First"},
            headers=app_with("users:write"),
        )
        again = await auth.post(
            "/v1/users",
            json={"user_id": user_id, "email": "second@example.com", "username": "Second"},
            headers=app_with("users:write"),
        )
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["created"] is False
        assert again.json()["email"] == "first@example.com"
        assert again.json()["created_at"] == first.json()["created_at"]
        await stream_event(redis, auth_stream, "user.created", {"user_id": user_id})
        await asyncio.sleep(0.3)
        assert await count_events(redis, auth_stream, user_id) == 1

    async def test_concurrent_creates_make_one_user_and_one_event(
        self, auth, new_user_id, redis, auth_stream
    ):
        user_id = new_user_id()
        results = await asyncio.gather(
            *(
                auth.post(
                    "/v1/users",
                    json={"user_id": user_id, "email": "c@example.com"},
                    headers=app_with("users:write"),
                )
                for _ in range(8)
            )
        )
        assert sorted(r.status_code for r in results) == [200] * 7 + [201]
        await stream_event(redis, auth_stream, "user.created", {"user_id": user_id})
        await asyncio.sleep(0.3)
        assert await count_events(redis, auth_stream, user_id) == 1

    async def test_user_created_event_reaches_the_stream(
        self, auth, new_user_id, redis, auth_stream
    ):
        user_id = new_user_id()
        r = await auth.post(
            "/v1/users",
            json={"user_id": user_id, "email": "e@example.com", "username": "Ev"},
            headers=app_with("users:write"),
        )
        assert r.status_code == 201
        event = await stream_event(redis, auth_stream, "user.created", {"user_id": user_id})
        assert event["payload"] == {"user_id": user_id, "username": "Ev", "email": "e@example.com"}

    async def test_event_is_written_in_the_users_transaction(self, sessions, new_user_id):
        user_id = new_user_id()
        async with sessions() as s:
            _, created = await users.create(s, user_id, email="t@example.com", username=None)
            assert created
            row = (
                await s.execute(
                    text("SELECT topic, payload FROM auth.outbox WHERE payload->>'user_id' = :u"),
                    {"u": user_id},
                )
            ).one()
            assert row.topic == "user.created" and row.payload["email"] == "t@example.com"
            await s.rollback()
        async with sessions() as s:
            assert (
                await s.scalar(text("SELECT count(*) FROM auth.users WHERE id=:u"), {"u": user_id})
                == 0
            )
            assert (
                await s.scalar(
                    text("SELECT count(*) FROM auth.outbox WHERE payload->>'user_id' = :u"),
                    {"u": user_id},
                )
                == 0
            )

    async def test_no_starting_balance_field_is_accepted(self, auth, new_user_id):
        r = await auth.post(
            "/v1/users",
            json={"user_id": new_user_id(), "email": "x@example.com", "initial_credits": 1000},
            headers=admin(),
        )
        assert r.status_code == 422


class TestCreateUserAccess:
    async def test_needs_users_write(self, auth, new_user_id):
        user_id = new_user_id()
        r = await auth.post(
            "/v1/users",
            json={"user_id": user_id, "email": "x@example.com"},
            headers=app_with("ledger:write"),
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "missing_scope"
        r = await auth.get(f"/v1/users/{user_id}", headers=admin())
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_user"

    async def test_without_principal_is_401(self, auth, new_user_id):
        r = await auth.post("/v1/users", json={"user_id": new_user_id(), "email": "x@example.com"})
        assert r.status_code == 401

    async def test_bad_input_is_422(self, auth):
        for payload in (
            {"user_id": "has space", "email": "x@example.com"},
            {"user_id": "", "email": "x@example.com"},
            {"user_id": "abc", "email": "not-an-email"},
            {"email": "x@example.com"},
        ):
            r = await auth.post("/v1/users", json=payload, headers=admin())
            assert r.status_code == 422, payload


class TestGetUser:
    async def test_user_token_reads_only_itself(self, auth, new_user_id):
        mine, other = new_user_id(), new_user_id()
        for user_id in (mine, other):
            r = await auth.post(
                "/v1/users", json={"user_id": user_id, "email": "g@example.com"}, headers=admin()
            )
            assert r.status_code == 201
        assert (await auth.get(f"/v1/users/{mine}", headers=user(mine))).status_code == 200
        r = await auth.get(f"/v1/users/{other}", headers=user(mine))
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_user"

    async def test_app_without_users_write_is_403(self, auth, new_user_id):
        user_id = new_user_id()
        await auth.post(
            "/v1/users", json={"user_id": user_id, "email": "g@example.com"}, headers=admin()
        )
        r = await auth.get(f"/v1/users/{user_id}", headers=app_with("ledger:read"))
        assert r.status_code == 403


class TestAppLinks:
    """Linking a user to an app lets that app's partner keys spend the user's credit:
    only an admin may do it; the user may see their links, no one else but an admin."""

    async def test_only_an_admin_links_a_user_to_an_app(self, auth, new_user_id):
        user_id = new_user_id()
        r = await auth.post(
            "/v1/users", json={"user_id": user_id, "email": "l@example.com"}, headers=admin()
        )
        assert r.status_code == 201
        partner = "p" + uuid.uuid4().hex[:10]
        r = await auth.post("/v1/apps", json={"name": partner}, headers=admin())
        assert r.status_code == 201, r.text
        path = f"/v1/users/{user_id}/apps"
        refused = {
            "first-party app": app_with("users:write", "users:any", "ledger:write"),
            "the partner itself": app_with("users:write", app=partner),
            "the user's own token": user(user_id),
            "the gateway (a service)": gateway(),
        }
        for who, headers in refused.items():
            r = await auth.post(path, json={"app": partner}, headers=headers)
            assert r.status_code == 403, (who, r.text)
            assert r.json()["error"]["code"] == "missing_scope", who
        r = await auth.post(path, json={"app": partner})
        assert r.status_code == 401
        r = await auth.get(path, headers=user(user_id))
        assert r.status_code == 200 and r.json()["apps"] == []  # nothing was linked
        r = await auth.post(path, json={"app": partner}, headers=admin())
        assert r.status_code == 200 and r.json()["apps"] == [partner], r.text
        # Reading the links: the user and admins; not another user, not an app.
        assert (await auth.get(path, headers=user(user_id))).json()["apps"] == [partner]
        other = new_user_id()
        assert (await auth.get(path, headers=user(other))).status_code == 403
        r = await auth.get(path, headers=app_with("users:write", app=partner))
        assert r.status_code == 403
