"""The workspace service: projects shared across apps, a per-user storage quota, exports."""

from __future__ import annotations

from fastapi import FastAPI

from services.kit.app import create_service_app
from services.workspace.api import routers
from services.workspace.config import get_settings
from services.workspace.links import consume_links
from services.workspace.models import SCHEMA

DESCRIPTION = """
Ku's workspace: every user's projects from every app (Penora texts, ImageGene
images, partners' work) in one place, under one storage quota (1 MB by default).

A project is addressed by a 6-character code (no 0/O, 1/I/L). Content is text, or
an image sent as base64 or a `data:` URL (decoded; its real size counts). A
project's size is its content plus its title and metadata. Saves that would pass
the quota are refused with 413 `storage_limit_exceeded`, even under concurrency.
`POST /v1/workspace/projects` accepts an optional `Idempotency-Key` header.
"""


def create_app() -> FastAPI:
    settings = get_settings()
    return create_service_app(
        name="workspace",
        settings=settings,
        routers=routers,
        title="Ku Workspace",
        description=DESCRIPTION,
        outbox_schema=SCHEMA,
        hooks=[consume_links],
    )
