"""`ku keys ...` and `ku users ...`: bootstrap and operate auth from a shell.

They talk to the database directly (no running service needed) through the same
service layer as the API, one transaction per command, so `ku users create`
writes its `user.created` event with the user and a running auth service relays
it. Results go to stdout (a new key alone on its line, so `KEY=$(ku keys create
...)` works); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.errors import KuError

T = TypeVar("T")


def _run(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    from services.kit.config import KuSettings
    from services.kit.db import create_engine, sessionmaker_for, unit_of_work

    async def main() -> T:
        settings = KuSettings(database_url=os.environ["KU_DATABASE_URL"])
        engine = create_engine(settings, pool_size=1)
        try:
            async with unit_of_work(sessionmaker_for(engine)) as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _validate(type_: Any, value: Any, what: str) -> Any:
    try:
        return TypeAdapter(type_).validate_python(value)
    except ValidationError as exc:
        raise KuError(f"invalid {what}: {exc.errors()[0]['msg']}") from None


def _command(ensure_urls: Callable[[], None], body: Callable[[argparse.Namespace], int]) -> Any:
    def run(args: argparse.Namespace) -> int:
        ensure_urls()
        try:
            return body(args)
        except KuError as exc:
            return _fail(exc.message)

    return run


def cmd_keys_create(args: argparse.Namespace) -> int:
    from services.auth.keys.schemas import Scope
    from services.auth.keys.service import keys
    from services.kit.schemas import AppName

    app = _validate(AppName, args.app, "app name")
    scopes = _validate(
        list[Scope], [s.strip() for s in args.scopes.split(",") if s.strip()], "scopes"
    )
    if not scopes:
        return _fail("--scopes needs at least one scope")
    expires_at = None
    if args.expires_in_days is not None:
        if args.expires_in_days < 1:
            return _fail("--expires-in-days must be at least 1")
        expires_at = datetime.now(UTC) + timedelta(days=args.expires_in_days)

    async def work(session: AsyncSession) -> tuple[Any, str]:
        await keys.ensure_app(session, app)
        return await keys.create_key(session, app, scopes, expires_at=expires_at, name=args.name)

    row, key = _run(work)
    expiry = row.expires_at.isoformat() if row.expires_at else "never"
    print(
        f"created key {row.prefix} for app {row.app} (scopes: {' '.join(row.scopes)}; "
        f"expires: {expiry}). It is shown once: store it now.",
        file=sys.stderr,
    )
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from services.auth.keys.service import is_live, keys

    rows = _run(lambda session: keys.list_keys(session, args.app))
    now = datetime.now(UTC)
    if args.json:
        out = [
            {
                "prefix": r.prefix,
                "app": r.app,
                "scopes": list(r.scopes),
                "name": r.name,
                "created_at": r.created_at.isoformat(),
                "expires_at": r.expires_at.isoformat() if r.expires_at else None,
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None,
                "live": is_live(r, now),
            }
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'PREFIX':<10} {'APP':<16} {'STATE':<8} {'EXPIRES':<20} {'LAST USED':<20} SCOPES")
    for r in rows:
        state = "revoked" if r.revoked_at else ("live" if is_live(r, now) else "expired")
        print(
            f"{r.prefix:<10} {r.app:<16} {state:<8} {_short(r.expires_at):<20} "
            f"{_short(r.last_used_at):<20} {','.join(r.scopes)}"
        )
    return 0


def _short(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from services.auth.keys.service import keys

    row = _run(lambda session: keys.revoke(session, args.prefix))
    print(f"revoked key {row.prefix} of app {row.app}", file=sys.stderr)
    print(row.prefix)
    return 0


def cmd_users_create(args: argparse.Namespace) -> int:
    from services.auth.users.schemas import UserCreate
    from services.auth.users.service import users

    try:
        body = UserCreate(user_id=args.id, email=args.email, username=args.username)
    except ValidationError as exc:
        err = exc.errors()[0]
        return _fail(f"invalid {'.'.join(str(p) for p in err['loc'])}: {err['msg']}")

    async def work(session: AsyncSession) -> tuple[Any, bool]:
        return await users.create(session, body.user_id, email=body.email, username=body.username)

    user, created = _run(work)
    if created:
        print(f"created user {user.id} <{user.email}>", file=sys.stderr)
    else:
        print(f"user {user.id} already exists; left unchanged", file=sys.stderr)
    print(user.id)
    return 0


def cmd_users_role(args: argparse.Namespace) -> int:
    """`ku users grant-admin` / `revoke-admin`: the first SSO admin needs a shell."""
    from services.auth.users.schemas import RoleChange
    from services.auth.users.service import users

    try:
        body = RoleChange(reason=args.reason)
    except ValidationError as exc:
        return _fail(f"invalid reason: {exc.errors()[0]['msg']}")
    who = f"cli:{os.environ.get('USER') or 'unknown'}"
    change = users.grant_role if args.users_command == "grant-admin" else users.revoke_role

    async def work(session: AsyncSession) -> list[str]:
        await change(session, args.id, "admin", by=who, reason=body.reason)
        return await users.roles(session, args.id)

    roles = _run(work)
    print(f"user {args.id} roles: {', '.join(roles) or 'none'}", file=sys.stderr)
    print(" ".join(roles))
    return 0


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    ensure_urls: Callable[[], None],
) -> None:
    keys_parser = subparsers.add_parser("keys", help="API keys of apps")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True)

    create = keys_sub.add_parser("create", help="issue a key (printed alone on stdout, once)")
    create.add_argument("--app", required=True, help="app name; created if it does not exist")
    create.add_argument(
        "--scopes", required=True, help="comma-separated, e.g. ledger:read,generate"
    )
    create.add_argument("--expires-in-days", type=int, default=None)
    create.add_argument("--name", default=None, help="a note, e.g. 'production web'")
    create.set_defaults(func=_command(ensure_urls, cmd_keys_create))

    list_ = keys_sub.add_parser("list", help="list keys (never their secrets)")
    list_.add_argument("--app", default=None)
    list_.add_argument("--json", action="store_true")
    list_.set_defaults(func=_command(ensure_urls, cmd_keys_list))

    revoke = keys_sub.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix")
    revoke.set_defaults(func=_command(ensure_urls, cmd_keys_revoke))

    users_parser = subparsers.add_parser("users", help="Ku users")
    users_sub = users_parser.add_subparsers(dest="users_command", required=True)
    ucreate = users_sub.add_parser("create", help="create a user (welcome credits follow)")
    ucreate.add_argument("--id", required=True, help="user id, e.g. the 21-digit SSO id")
    ucreate.add_argument("--email", required=True)
    ucreate.add_argument("--username", default=None)
    ucreate.set_defaults(func=_command(ensure_urls, cmd_users_create))
    for name, verb in (("grant-admin", "give"), ("revoke-admin", "take")):
        role = users_sub.add_parser(
            name, help=f"{verb} a user's SSO account the admin role (console, admin API)"
        )
        role.add_argument("--id", required=True, help="user id")
        role.add_argument("--reason", required=True, help="why (kept on the record)")
        role.set_defaults(func=_command(ensure_urls, cmd_users_role))
