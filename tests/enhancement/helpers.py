"""Helpers for the in-process enhancement tests."""

from __future__ import annotations

import uuid

from services.enhancement.repository import Repository
from services.enhancement.service import Enhancer


async def insert_task(e: Enhancer, **values: object) -> uuid.UUID:
    from datetime import UTC, datetime

    task_id = uuid.uuid4()
    row = {
        "id": task_id,
        "user_id": f"u{task_id.hex[:8]}",
        "app": "imagegene",
        "enhancement_type": "lighting",
        "strength": 0.5,
        "input_source": "upload",
        "input_key": f"inputs/{task_id}",
        "input_content_type": "image/png",
        "input_width": 1,
        "input_height": 1,
        "price_milli": 2000,
        "deadline_at": datetime.now(UTC),
        **values,
    }
    async with e.uow() as session:
        assert await Repository(session).insert_task(row) is not None
    return task_id
