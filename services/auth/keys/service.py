"""Apps and their API keys.

A key is `ku_<prefix>_<secret>`: an 8-character visible prefix (the key's id,
safe to log) and 43 urlsafe characters (256 random bits). Only the prefix and
the sha256 of the whole key are stored; the key itself is shown once. Checking a
key compares hashes in constant time, and takes the same path whether or not
the prefix exists.

Rotation issues a new key with the same app and scopes and lets the old one
work for an overlap window, so clients can be redeployed without downtime.
Revocation (and a rotation without overlap) emits `key.revoked` {prefix}, so
gateways drop a cached key at once instead of waiting for their cache to expire.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.keys.repository import KeyRepository
from services.auth.models import ApiKey, App, outbox
from services.kit.errors import Conflict, NotFound, Unauthorized, Unprocessable
from services.kit.outbox import emit

KEY_REVOKED = "key.revoked"
KEY_ROTATED = "key.rotated"

_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_KEY = re.compile(r"^ku_([a-z0-9]{8})_([A-Za-z0-9_-]{43})$")
# Compared against when the prefix is unknown, so both paths cost the same.
_DUMMY_HASH = hashlib.sha256(b"ku_no-such-key").hexdigest()


def generate_key() -> tuple[str, str]:
    """(prefix, key)"""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    return prefix, f"ku_{prefix}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def invalid_key() -> Unauthorized:
    return Unauthorized("Invalid API key", code="invalid_api_key")


def is_live(key: ApiKey, now: datetime) -> bool:
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


class KeyService:
    async def create_app(
        self, session: AsyncSession, name: str, description: str | None = None
    ) -> App:
        app = await KeyRepository(session).insert_app(name, description)
        if app is None:
            raise Conflict("An app with this name exists", code="app_exists", app=name)
        return app

    async def ensure_app(self, session: AsyncSession, name: str) -> App:
        repo = KeyRepository(session)
        app = await repo.insert_app(name, None) or await repo.app(name)
        assert app is not None
        return app

    async def list_apps(self, session: AsyncSession) -> list[tuple[App, int]]:
        return await KeyRepository(session).apps_with_active_keys(datetime.now(UTC))

    async def create_key(
        self,
        session: AsyncSession,
        app: str,
        scopes: list[str],
        *,
        expires_at: datetime | None = None,
        name: str | None = None,
    ) -> tuple[ApiKey, str]:
        """The stored key and the secret key (shown once)."""
        repo = KeyRepository(session)
        if await repo.app(app) is None:
            raise NotFound("No such app", code="unknown_app", app=app)
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise Unprocessable("expires_at is in the past", code="expires_at_in_past")
        scopes = sorted(set(scopes))
        while True:  # 36^8 prefixes: a collision is rare; draw again if it happens
            prefix, key = generate_key()
            row = await repo.insert_key(
                prefix=prefix,
                app=app,
                key_hash=hash_key(key),
                scopes=scopes,
                name=name,
                expires_at=expires_at,
            )
            if row is not None:
                return row, key

    async def list_keys(self, session: AsyncSession, app: str | None = None) -> list[ApiKey]:
        return await KeyRepository(session).keys(app)

    async def get_key(self, session: AsyncSession, prefix: str, *, lock: bool = False) -> ApiKey:
        row = await KeyRepository(session).key(prefix, for_update=lock)
        if row is None:
            raise NotFound("No such key", code="unknown_key", prefix=prefix)
        return row

    async def revoke(self, session: AsyncSession, prefix: str) -> ApiKey:
        """Revoke a key (idempotent: revoking twice changes nothing and emits once)."""
        row = await self.get_key(session, prefix, lock=True)
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
            await session.flush()
            await emit(session, outbox, KEY_REVOKED, {"prefix": prefix, "app": row.app})
        return row

    async def rotate(
        self, session: AsyncSession, prefix: str, overlap_seconds: int
    ) -> tuple[ApiKey, str, ApiKey]:
        """(new key, its secret, old key): the old key expires after the overlap."""
        old = await self.get_key(session, prefix, lock=True)
        now = datetime.now(UTC)
        if old.revoked_at is not None:
            raise Conflict("This key is revoked", code="key_revoked", prefix=prefix)
        if old.expires_at is not None and old.expires_at <= now:
            raise Conflict("This key has expired", code="key_expired", prefix=prefix)
        if old.replaced_by is not None:
            raise Conflict(
                "This key was already rotated",
                code="key_already_rotated",
                prefix=prefix,
                replaced_by=old.replaced_by,
            )
        # The new key lives as long as the old one was meant to.
        lifetime = old.expires_at - old.created_at if old.expires_at is not None else None
        new, key = await self.create_key(
            session,
            old.app,
            list(old.scopes),
            expires_at=now + lifetime if lifetime is not None else None,
            name=old.name,
        )
        old.replaced_by = new.prefix
        if overlap_seconds == 0:
            old.revoked_at = now
            await emit(session, outbox, KEY_REVOKED, {"prefix": prefix, "app": old.app})
        else:
            end = now + timedelta(seconds=overlap_seconds)
            old.expires_at = min(old.expires_at, end) if old.expires_at else end
            await emit(
                session,
                outbox,
                KEY_ROTATED,
                {
                    "prefix": prefix,
                    "app": old.app,
                    "replaced_by": new.prefix,
                    "expires_at": old.expires_at.isoformat(),
                },
            )
        await session.flush()
        return new, key, old

    async def verify(self, session: AsyncSession, key: str, *, touch_seconds: int) -> ApiKey:
        """The live key matching `key`, or 401 invalid_api_key (whatever the reason)."""
        match = _KEY.match(key)
        row = await KeyRepository(session).key(match.group(1)) if match else None
        ok = hmac.compare_digest(hash_key(key), row.key_hash if row else _DUMMY_HASH)
        now = datetime.now(UTC)
        if row is None or not ok or not is_live(row, now):
            raise invalid_key()
        # Written at most once per `touch_seconds` per key: verification stays read-mostly.
        not_since = now - timedelta(seconds=touch_seconds)
        if row.last_used_at is None or row.last_used_at < not_since:
            await KeyRepository(session).touch(row.prefix, now, not_since)
        return row


keys = KeyService()
