"""Idempotent mutations: the first result of a key is stored with a hash of its
request; a replay returns it, the same key with another request is 409.

`claim()` inserts the key before the work, in the caller's transaction, so a
concurrent duplicate waits on the row lock until the first commits (then it
replays) or rolls back (then it runs). Failures roll the key back with
everything else, so only successful results are remembered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.errors import BadRequest, Conflict

IDEMPOTENCY_HEADER = "idempotency-key"
MAX_KEY_LENGTH = 200


def idempotency_table(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys",
        metadata,
        Column("scope", Text, primary_key=True),
        Column("key", Text, primary_key=True),
        Column("request_hash", Text, nullable=False),
        Column("status_code", Integer, nullable=True),
        Column("response", JSONB, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


def request_hash(data: Any) -> str:
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def key_from_request(request: Request, natural: str | None = None) -> str | None:
    """The Idempotency-Key header, else a natural reference, else None."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None:
        key = key.strip()
        if not key or len(key) > MAX_KEY_LENGTH:
            raise BadRequest(
                f"Idempotency-Key must be 1..{MAX_KEY_LENGTH} characters",
                code="invalid_idempotency_key",
            )
        return key
    return natural


@dataclass
class Replay:
    status_code: int
    response: Any


async def claim(
    session: AsyncSession, table: Table, scope: str, key: str, req_hash: str
) -> Replay | None:
    """Reserve `key` for this request, or return the stored result to replay."""
    fq = f"{table.schema}.{table.name}"
    inserted = await session.execute(
        text(
            f"INSERT INTO {fq} (scope, key, request_hash) VALUES (:s, :k, :h)"
            " ON CONFLICT DO NOTHING RETURNING key"
        ),
        {"s": scope, "k": key, "h": req_hash},
    )
    if inserted.first() is not None:
        return None
    row = (
        await session.execute(
            text(f"SELECT request_hash, status_code, response FROM {fq} WHERE scope=:s AND key=:k"),
            {"s": scope, "k": key},
        )
    ).first()
    if row is None or row.request_hash != req_hash:
        raise Conflict(
            "This Idempotency-Key was used with a different request",
            code="idempotency_key_reused",
        )
    return Replay(row.status_code or 200, row.response)


async def complete(
    session: AsyncSession, table: Table, scope: str, key: str, status_code: int, response: Any
) -> None:
    await session.execute(
        text(
            f"UPDATE {table.schema}.{table.name} SET status_code=:c, response=CAST(:r AS jsonb)"
            " WHERE scope=:s AND key=:k"
        ),
        {"c": status_code, "r": orjson.dumps(response).decode(), "s": scope, "k": key},
    )
