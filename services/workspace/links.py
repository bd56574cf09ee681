"""Which users a partner app may act for: the workspace's copy of auth's links, kept
from `user.linked` events (signed by auth; see services.kit.bus)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.kit.bus import Consumer
from services.kit.db import unit_of_work
from services.kit.outbox import stream_name
from services.workspace.repository import WorkspaceRepository


def links_handler(sessionmaker: Any) -> Any:
    async def handle(event: dict[str, Any]) -> None:
        payload = event["payload"]
        async with unit_of_work(sessionmaker) as session:
            await WorkspaceRepository(session).link(str(payload["user_id"]), str(payload["app"]))

    return handle


@asynccontextmanager
async def consume_links(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan hook: record every `user.linked` (idempotent: a link is a set member)."""
    settings = app.state.settings
    consumer = Consumer(
        app.state.redis,
        [stream_name(settings.bus_prefix, "auth")],
        group="workspace",
        handler=links_handler(app.state.sessionmaker),
        topics={"user.linked"},
    )
    consumer.start()
    try:
        yield
    finally:
        await consumer.stop()
