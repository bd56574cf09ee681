"""Liveness (`/health`: the process answers) and readiness (`/ready`: db and redis)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from sqlalchemy import text
from starlette.responses import JSONResponse

router = APIRouter(include_in_schema=False)


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    return {"status": "ok", "service": request.app.state.service_name}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is not None:
        try:
            async with asyncio.timeout(2):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
    redis = getattr(state, "redis", None)
    if redis is not None:
        try:
            async with asyncio.timeout(2):
                await redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )
