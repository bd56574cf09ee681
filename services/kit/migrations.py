"""Per-service Alembic migrations, each with its version table inside its own schema.

A service's `migrations/env.py` is two lines: it calls `run_env(metadata)`.
`upgrade_all()` migrates every service that has migrations (`ku migrate`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.kit.db import async_url

SERVICES_DIR = Path(__file__).resolve().parent.parent
# Order matters only for humans reading logs; schemas never reference each other.
SERVICE_ORDER = ("auth", "ledger", "workspace", "generation", "enhancement")


def services_with_migrations() -> list[str]:
    return [s for s in SERVICE_ORDER if (SERVICES_DIR / s / "migrations" / "env.py").exists()]


def alembic_config(service: str, database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SERVICES_DIR / service / "migrations"))
    cfg.set_main_option("sqlalchemy.url", async_url(database_url).replace("%", "%%"))
    cfg.attributes["schema"] = service
    return cfg


def upgrade_all(database_url: str, revision: str = "head") -> list[str]:
    done = []
    for service in services_with_migrations():
        command.upgrade(alembic_config(service, database_url), revision)
        done.append(service)
    return done


def check_all(database_url: str) -> None:
    """Raise if any service's models and migrations disagree (`alembic check`)."""
    for service in services_with_migrations():
        command.check(alembic_config(service, database_url))


def run_env(target_metadata: MetaData) -> None:
    """Body of every service's env.py (online mode only: we always have a database)."""
    config = context.config
    schema = config.attributes.get("schema") or target_metadata.schema
    assert schema, "a service's metadata must name its schema"

    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ == "schema":
            return name == schema
        return True

    def do_run(connection: Connection) -> None:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table_schema=schema,
            include_schemas=True,
            include_name=include_name,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run_async() -> None:
        url = config.get_main_option("sqlalchemy.url")
        assert url, "alembic_config() sets sqlalchemy.url"
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as connection:
            await connection.run_sync(do_run)
            await connection.commit()
        await engine.dispose()

    asyncio.run(run_async())


def execute_script(sql: str) -> None:
    """Run a multi-statement SQL script (e.g. PL/pgSQL functions) inside a migration.

    asyncpg's extended protocol takes one statement at a time; its plain `execute`
    without arguments uses the simple protocol, which takes a whole script.
    """
    from sqlalchemy.util import await_only

    driver = context.get_bind().connection.driver_connection
    assert driver is not None, "migrations run on an open asyncpg connection"
    await_only(driver.execute(sql))
