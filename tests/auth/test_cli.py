from __future__ import annotations

import asyncio
import json
import re
import secrets

from sqlalchemy import text

from services.cli import main
from tests.auth.helpers import admin, gateway, stream_event

KEY_LINE = re.compile(r"^ku_[a-z0-9]{8}_[A-Za-z0-9_-]{43}\n$")


async def ku(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `ku ...` in a thread (the CLI runs its own event loop) and capture its output."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def verify(auth, key: str):
    return await auth.post("/internal/keys/verify", json={"key": key}, headers=gateway())


class TestKeysCommands:
    async def test_create_prints_the_key_alone_and_it_works(self, auth, capsys, sessions):
        app = f"cli-{secrets.token_hex(3)}"
        code, out, err = await ku(
            capsys,
            "keys",
            "create",
            "--app",
            app,
            "--scopes",
            "ledger:read,generate",
            "--expires-in-days",
            "7",
        )
        assert code == 0 and KEY_LINE.match(out), (out, err)
        assert app in err and out.strip() not in err
        r = await verify(auth, out.strip())
        assert r.status_code == 200
        assert r.json()["app"] == app and r.json()["scopes"] == ["generate", "ledger:read"]
        assert r.json()["expires_at"] is not None
        async with sessions() as s:
            assert (
                await s.scalar(text("SELECT count(*) FROM auth.apps WHERE name=:a"), {"a": app})
                == 1
            )

    async def test_create_reuses_an_existing_app(self, auth, capsys, sessions):
        app = f"cli-{secrets.token_hex(3)}"
        for _ in range(2):
            code, out, _ = await ku(capsys, "keys", "create", "--app", app, "--scopes", "admin")
            assert code == 0 and KEY_LINE.match(out)
        async with sessions() as s:
            n = await s.scalar(text("SELECT count(*) FROM auth.api_keys WHERE app=:a"), {"a": app})
        assert n == 2

    async def test_bad_scope_fails_and_prints_no_key(self, capsys, sessions):
        app = f"cli-{secrets.token_hex(3)}"
        code, out, err = await ku(
            capsys, "keys", "create", "--app", app, "--scopes", "ledger:read,god"
        )
        assert code == 1 and out == "" and "scopes" in err
        async with sessions() as s:
            assert (
                await s.scalar(text("SELECT count(*) FROM auth.apps WHERE name=:a"), {"a": app})
                == 0
            )

    async def test_list_and_revoke(self, auth, capsys, redis, auth_stream):
        app = f"cli-{secrets.token_hex(3)}"
        _, out, _ = await ku(capsys, "keys", "create", "--app", app, "--scopes", "enhance")
        key = out.strip()
        prefix = key.split("_")[1]
        code, out, _ = await ku(capsys, "keys", "list", "--app", app, "--json")
        listed = json.loads(out)
        assert code == 0 and [k["prefix"] for k in listed] == [prefix]
        assert listed[0]["live"] is True and key not in out
        code, out, _ = await ku(capsys, "keys", "list")
        assert code == 0 and prefix in out and "live" in out and key not in out

        code, out, _ = await ku(capsys, "keys", "revoke", prefix)
        assert code == 0 and out.strip() == prefix
        assert (await verify(auth, key)).status_code == 401
        await stream_event(redis, auth_stream, "key.revoked", {"prefix": prefix})
        code, out, _ = await ku(capsys, "keys", "list", "--app", app, "--json")
        assert json.loads(out)[0]["live"] is False

    async def test_revoke_unknown_prefix_fails(self, capsys):
        code, out, err = await ku(capsys, "keys", "revoke", "zzzzzzzz")
        assert code == 1 and out == "" and "No such key" in err


class TestUsersCommands:
    async def test_create_user_emits_user_created(
        self, auth, capsys, new_user_id, redis, auth_stream
    ):
        user_id = new_user_id()
        code, out, err = await ku(
            capsys,
            "users",
            "create",
            "--id",
            user_id,
            "--email",
            "cli@example.com",
            "--username",
            "Cli",
        )
        assert code == 0 and out == f"{user_id}\n", err
        event = await stream_event(redis, auth_stream, "user.created", {"user_id": user_id})
        assert event["payload"] == {
            "user_id": user_id,
            "username": "Cli",
            "email": "cli@example.com",
        }
        r = await auth.get(f"/v1/users/{user_id}", headers=admin())
        assert r.status_code == 200 and r.json()["email"] == "cli@example.com"

        code, out, err = await ku(
            capsys, "users", "create", "--id", user_id, "--email", "other@example.com"
        )
        assert code == 0 and out == f"{user_id}\n" and "already exists" in err
        r = await auth.get(f"/v1/users/{user_id}", headers=admin())
        assert r.json()["email"] == "cli@example.com"

    async def test_invalid_email_fails(self, capsys, new_user_id, sessions):
        user_id = new_user_id()
        code, out, err = await ku(capsys, "users", "create", "--id", user_id, "--email", "nope")
        assert code == 1 and out == "" and "email" in err
        async with sessions() as s:
            assert (
                await s.scalar(text("SELECT count(*) FROM auth.users WHERE id=:u"), {"u": user_id})
                == 0
            )
