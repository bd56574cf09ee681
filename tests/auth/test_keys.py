from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.auth.helpers import admin, app_with, gateway, stream_event, user

KEY_FORMAT = re.compile(r"^ku_[a-z0-9]{8}_[A-Za-z0-9_-]{43}$")
SEED_KEY = "Pl2UbWIUMgFNQ-iUtQZSozcSUTd1cyNtsNDMhw87bTRST2fN15qT8DP0MG8ZihhZLDcX14xZlikbuwqlIQZ-og"


def seed_key_is_the_printed_one() -> bool:
    seeds = Path(__file__).resolve().parents[3] / "shared" / "seeds"
    if not seeds.exists():  # the seeds live beside the repository, not in it
        return True
    return any(SEED_KEY in p.read_text() for p in seeds.glob("000_*.txt"))


@pytest.fixture
async def new_app(auth):
    async def make() -> str:
        name = f"app-{secrets.token_hex(4)}"
        r = await auth.post("/v1/apps", json={"name": name}, headers=admin())
        assert r.status_code == 201, r.text
        return name

    return make


@pytest.fixture
async def new_key(auth, new_app):
    async def make(scopes=("ledger:read", "ledger:write"), **extra) -> dict:
        app = extra.pop("app", None) or await new_app()
        r = await auth.post(
            "/v1/keys", json={"app": app, "scopes": list(scopes), **extra}, headers=admin()
        )
        assert r.status_code == 201, r.text
        return r.json()

    return make


async def verify(auth, key: str, headers=None):
    return await auth.post(
        "/internal/keys/verify",
        json={"key": key},
        headers=gateway() if headers is None else headers,
    )


def assert_invalid(r) -> None:
    assert r.status_code == 401, r.text
    assert r.json() == {"error": {"code": "invalid_api_key", "message": "Invalid API key"}}


async def set_key(sessions, prefix: str, **values) -> None:
    sets = ", ".join(f"{k} = :{k}" for k in values)
    async with sessions() as s:
        await s.execute(
            text(f"UPDATE auth.api_keys SET {sets} WHERE prefix = :p"), {"p": prefix, **values}
        )
        await s.commit()


class TestApps:
    async def test_create_and_list(self, auth, new_app, new_key):
        name = await new_app()
        await new_key(app=name)
        r = await auth.post("/v1/apps", json={"name": name}, headers=admin())
        assert r.status_code == 409 and r.json()["error"]["code"] == "app_exists"
        listed = {a["name"]: a for a in (await auth.get("/v1/apps", headers=admin())).json()}
        assert listed[name]["active_keys"] == 1

    async def test_admin_only(self, auth):
        for path in ("/v1/apps", "/v1/keys"):
            r = await auth.get(path, headers=app_with("users:write", "ledger:write"))
            assert r.status_code == 403, path
        r = await auth.post("/v1/apps", json={"name": "sneaky"}, headers=app_with("users:write"))
        assert r.status_code == 403


class TestCreateKey:
    async def test_key_is_shown_once_and_stored_as_hash(self, auth, new_key, sessions):
        created = await new_key(scopes=("generate", "ledger:read"), name="web")
        key = created["key"]
        assert KEY_FORMAT.match(key) and key.split("_")[1] == created["prefix"]
        assert created["scopes"] == ["generate", "ledger:read"]
        async with sessions() as s:
            row = (
                await s.execute(
                    text("SELECT * FROM auth.api_keys WHERE prefix = :p"), {"p": created["prefix"]}
                )
            ).one()
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert key not in " ".join(str(v) for v in row)
        listed = (await auth.get("/v1/keys", headers=admin())).text
        assert created["prefix"] in listed and key not in listed
        one = (await auth.get(f"/v1/keys/{created['prefix']}", headers=admin())).json()
        assert "key" not in one and one["name"] == "web"

    async def test_bad_requests(self, auth, new_app):
        app = await new_app()
        past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        cases = [
            ({"app": app, "scopes": []}, 422),
            ({"app": app, "scopes": ["superuser"]}, 422),
            ({"app": app, "scopes": ["admin"], "expires_in_days": 0}, 422),
            ({"app": app, "scopes": ["admin"], "expires_at": past}, 422),
            ({"app": "no-such-app", "scopes": ["admin"]}, 404),
            ({"app": "Bad Name", "scopes": ["admin"]}, 422),
        ]
        for payload, status in cases:
            r = await auth.post("/v1/keys", json=payload, headers=admin())
            assert r.status_code == status, (payload, r.text)
        keys = (await auth.get("/v1/keys", params={"app": app}, headers=admin())).json()
        assert keys == []


class TestVerify:
    async def test_valid_key(self, auth, new_key):
        created = await new_key(scopes=("enhance", "ledger:write"), expires_in_days=30)
        r = await verify(auth, created["key"])
        assert r.status_code == 200, r.text
        assert r.json() == {
            "app": created["app"],
            "scopes": ["enhance", "ledger:write"],
            "prefix": created["prefix"],
            "expires_at": created["expires_at"],
        }

    async def test_seed_key_never_works(self, auth):
        assert seed_key_is_the_printed_one()
        assert_invalid(await verify(auth, SEED_KEY))
        assert_invalid(await verify(auth, f"ku_{SEED_KEY[:8].lower()}_{SEED_KEY[:43]}"))

    async def test_wrong_secret_with_a_real_prefix(self, auth, new_key):
        created = await new_key()
        key = created["key"]
        flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
        assert_invalid(await verify(auth, flipped))
        for junk in ("", "ku_", key + "x", key.upper(), f"ku_{created['prefix']}"):
            assert_invalid(await verify(auth, junk))
        assert (await verify(auth, key)).status_code == 200

    async def test_only_service_principals_may_verify(self, auth, new_key):
        key = (await new_key())["key"]
        r = await verify(auth, key, headers=admin())
        assert r.status_code == 403 and r.json()["error"]["code"] == "service_only"
        r = await verify(auth, key, headers=user("123456789012345678901"))
        assert r.status_code == 403
        r = await verify(auth, key, headers={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_principal"
        r = await verify(auth, key, headers={"x-ku-principal": "forged.header"})
        assert r.status_code == 401

    async def test_expired_key_is_rejected(self, auth, new_key, sessions):
        created = await new_key(expires_in_days=1)
        assert (await verify(auth, created["key"])).status_code == 200
        await set_key(
            sessions, created["prefix"], expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
        assert_invalid(await verify(auth, created["key"]))

    async def test_last_used_at_is_written_at_most_once_a_minute(self, auth, new_key, sessions):
        created = await new_key()
        assert created["last_used_at"] is None

        async def last_used() -> datetime:
            async with sessions() as s:
                return await s.scalar(
                    text("SELECT last_used_at FROM auth.api_keys WHERE prefix = :p"),
                    {"p": created["prefix"]},
                )

        await verify(auth, created["key"])
        first = await last_used()
        assert first is not None and datetime.now(UTC) - first < timedelta(seconds=10)
        await verify(auth, created["key"])
        assert await last_used() == first
        stale = datetime.now(UTC) - timedelta(minutes=2)
        await set_key(sessions, created["prefix"], last_used_at=stale)
        await verify(auth, created["key"])
        assert await last_used() > stale + timedelta(minutes=1)


class TestRevoke:
    async def test_revoked_key_stops_working_and_gateways_hear_of_it(
        self, auth, new_key, redis, auth_stream
    ):
        created = await new_key()
        assert (await verify(auth, created["key"])).status_code == 200
        r = await auth.post(f"/v1/keys/{created['prefix']}/revoke", headers=admin())
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
        assert_invalid(await verify(auth, created["key"]))
        event = await stream_event(redis, auth_stream, "key.revoked", {"prefix": created["prefix"]})
        assert event["payload"]["app"] == created["app"]
        again = await auth.post(f"/v1/keys/{created['prefix']}/revoke", headers=admin())
        assert again.status_code == 200 and again.json()["revoked_at"] == r.json()["revoked_at"]

    async def test_unknown_prefix_is_404(self, auth):
        r = await auth.post("/v1/keys/zzzzzzzz/revoke", headers=admin())
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_key"

    async def test_needs_admin(self, auth, new_key):
        created = await new_key()
        r = await auth.post(f"/v1/keys/{created['prefix']}/revoke", headers=app_with("users:write"))
        assert r.status_code == 403
        assert (await verify(auth, created["key"])).status_code == 200


class TestRotate:
    async def test_both_keys_work_during_the_overlap(self, auth, new_key):
        old = await new_key(scopes=("generate",))
        before = datetime.now(UTC)
        r = await auth.post(
            f"/v1/keys/{old['prefix']}/rotate", json={"overlap_seconds": 120}, headers=admin()
        )
        assert r.status_code == 201, r.text
        new = r.json()
        assert KEY_FORMAT.match(new["key"]) and new["prefix"] != old["prefix"]
        assert new["scopes"] == ["generate"] and new["app"] == old["app"]
        assert new["previous"]["replaced_by"] == new["prefix"]
        old_expiry = datetime.fromisoformat(new["previous"]["expires_at"])
        assert timedelta(seconds=110) < old_expiry - before < timedelta(seconds=130)
        old_verified = await verify(auth, old["key"])
        assert old_verified.status_code == 200
        assert old_verified.json()["expires_at"] == new["previous"]["expires_at"]
        assert (await verify(auth, new["key"])).status_code == 200

    async def test_old_key_stops_after_the_overlap(self, auth, new_key, sessions):
        old = await new_key()
        new = (
            await auth.post(
                f"/v1/keys/{old['prefix']}/rotate", json={"overlap_seconds": 60}, headers=admin()
            )
        ).json()
        # Time travel: the overlap is over.
        await set_key(sessions, old["prefix"], expires_at=datetime.now(UTC) - timedelta(seconds=1))
        assert_invalid(await verify(auth, old["key"]))
        assert (await verify(auth, new["key"])).status_code == 200

    async def test_zero_overlap_revokes_now(self, auth, new_key, redis, auth_stream):
        old = await new_key()
        r = await auth.post(
            f"/v1/keys/{old['prefix']}/rotate", json={"overlap_seconds": 0}, headers=admin()
        )
        assert r.status_code == 201
        assert_invalid(await verify(auth, old["key"]))
        assert (await verify(auth, r.json()["key"])).status_code == 200
        await stream_event(redis, auth_stream, "key.revoked", {"prefix": old["prefix"]})

    async def test_cannot_rotate_twice_or_a_revoked_key(self, auth, new_key):
        old = await new_key()
        url = f"/v1/keys/{old['prefix']}/rotate"
        assert (
            await auth.post(url, json={"overlap_seconds": 60}, headers=admin())
        ).status_code == 201
        r = await auth.post(url, json={"overlap_seconds": 60}, headers=admin())
        assert r.status_code == 409 and r.json()["error"]["code"] == "key_already_rotated"
        revoked = await new_key()
        await auth.post(f"/v1/keys/{revoked['prefix']}/revoke", headers=admin())
        r = await auth.post(f"/v1/keys/{revoked['prefix']}/rotate", json={}, headers=admin())
        assert r.status_code == 409 and r.json()["error"]["code"] == "key_revoked"

    async def test_new_key_keeps_the_lifetime(self, auth, new_key):
        old = await new_key(expires_in_days=10)
        r = await auth.post(f"/v1/keys/{old['prefix']}/rotate", headers=admin())
        assert r.status_code == 201
        expires = datetime.fromisoformat(r.json()["expires_at"])
        assert timedelta(days=9, hours=23) < expires - datetime.now(UTC) <= timedelta(days=10)
        # The default overlap is an hour.
        previous = datetime.fromisoformat(r.json()["previous"]["expires_at"])
        assert timedelta(minutes=59) < previous - datetime.now(UTC) <= timedelta(hours=1)
