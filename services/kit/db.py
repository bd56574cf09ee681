"""Database plumbing: one async engine per process, a request-scoped unit of work,
and a declarative base per service schema.

Services never commit: `session_dependency` commits when the request succeeds and
rolls back when it raises. Jobs use `unit_of_work()` the same way.

Surviving a database restart (a failover, `pg_terminate_backend`): a pooled connection
whose server went away is noticed by asyncpg as soon as the socket closes, so the pool
checks `is_closed()` at checkout and replaces a dead connection for free (SQLAlchemy's
`pool_pre_ping` would cost three round trips per checkout with asyncpg). A connection
that dies in use fails its request with an error `is_disconnect()` recognises; the
kit's middleware retries such a request once when that is safe (GET/HEAD, or a request
carrying an `Idempotency-Key`) and otherwise answers a JSON 503 with `Retry-After`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy import MetaData, event, exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from services.kit.config import KuSettings

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def schema_metadata(schema: str) -> MetaData:
    """The MetaData of a service's declarative base: its schema and the naming convention.

    class Base(DeclarativeBase):
        metadata = schema_metadata("ledger")
    """
    return MetaData(schema=schema, naming_convention=NAMING_CONVENTION)


def async_url(url: str) -> str:
    """Accept plain postgres:// URLs and point SQLAlchemy at asyncpg."""
    for prefix in ("postgresql+asyncpg://", "postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def plain_url(url: str) -> str:
    """The libpq/asyncpg form of a database URL."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def create_engine(settings: KuSettings, *, pool_size: int | None = None) -> AsyncEngine:
    engine = create_async_engine(
        async_url(settings.database_url),
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=False,
        pool_recycle=1800,
    )
    event.listen(engine.sync_engine.pool, "checkout", _refuse_closed)
    return engine


def _refuse_closed(_: Any, record: ConnectionPoolEntry, __: Any) -> None:
    """Pool checkout: a connection the server closed is replaced, not handed out."""
    driver = record.driver_connection
    if driver is not None and driver.is_closed():
        # The pool discards this connection and checks out (or opens) another.
        raise exc.DisconnectionError("connection closed by the server")


# Errors that mean "the connection (or the server) went away", not "the query is wrong".
_GONE = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57P0x: terminated, shutting down
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    # What asyncpg raises when a connection broke mid-operation and is used again
    # ("cannot switch to state ...; another operation is in progress").
    asyncpg.InternalClientError,
    ConnectionError,
    exc.DisconnectionError,
)


def is_disconnect(error: BaseException) -> bool:
    """True when `error` (or what it wraps) is a lost or refused database connection."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _GONE):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection" in str(current):
            return True
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and id(orig) not in seen:
            current = orig
            continue
        current = current.__cause__ or current.__context__
    return False


def is_unavailable(error: BaseException) -> bool:
    """A disconnect, or a pool with no connection to give in time: a 503, not a 500."""
    return is_disconnect(error) or isinstance(error, exc.TimeoutError)


def sessionmaker_for(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def unit_of_work(
    factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def session_dependency(request: Request) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: one session per request, committed on success."""
    async with unit_of_work(request.app.state.sessionmaker) as session:
        yield session


# exit runs before the response is sent, so a failed commit can never hide behind a 2xx.
Session = Annotated[AsyncSession, Depends(session_dependency, scope="function")]
