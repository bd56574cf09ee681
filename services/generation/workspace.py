"""Saving a result to the user's workspace, as the generation service on the user's
behalf. A full workspace (413) or any failure is reported, never raised: the
generation was paid for and is returned regardless."""

from __future__ import annotations

import logging
from typing import Any

from services.generation.service import Caller
from services.kit.errors import KuError
from services.kit.service_client import ServiceClient

log = logging.getLogger("ku.generation.workspace")


async def save(
    client: ServiceClient,
    caller: Caller,
    *,
    title: str,
    content: str,
    project_type: str,
    metadata: dict[str, Any],
    key: str,
) -> tuple[str | None, dict[str, Any] | None]:
    """(project code, None) or (None, the error as {code, message, detail})."""
    try:
        body = await client.json(
            "workspace",
            "POST",
            "/v1/workspace/projects",
            json={
                "user_id": caller.user_id,
                "app_source": caller.app,
                "project_type": project_type,
                "title": title[:200],
                "content": content,
                "metadata": metadata,
            },
            idempotency_key=key,
            origin=caller.origin,
        )
        return str(body["code"]), None
    except KuError as exc:
        log.info("save for %s refused: %s", caller.user_id, exc.code)
        return None, exc.body()["error"]


def title_from(prompt: str) -> str:
    words = prompt.split()
    title = " ".join(words[:8])
    return title + ("…" if len(words) > 8 else "")
