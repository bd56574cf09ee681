"""Request dependencies shared by the native and the OpenAI-compatible routes: who is
calling, for which user, booked in which app's lane."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from services.generation.service import Caller, GenerationEngine
from services.kit.errors import Forbidden, Unprocessable
from services.kit.principal import PRINCIPAL_HEADER, Principal

# A user token that names no app came through Penora (the first-party frontend).
DEFAULT_APP = "penora"


def caller_for(principal: Principal, request: Request, user_id: str | None) -> Caller:
    """Generating spends the user's credit: scope `generate`; a user token for itself,
    an app for the user it names (the ledger decides whether that app may)."""
    principal.require_scope("generate")
    if principal.kind == "user":
        if user_id is not None and user_id != principal.user_id:
            raise Forbidden("A user token may act only on its own user", code="wrong_user")
        target = principal.user_id
    else:
        target = user_id
    if not target:
        raise Unprocessable("user_id is required for app keys", code="user_id_required")
    return Caller(
        user_id=target,
        app=principal.app or DEFAULT_APP,
        origin=request.headers.get(PRINCIPAL_HEADER),
    )


@dataclass(frozen=True)
class Reader:
    """Whose generations a caller may read: a user token all of its own user's; an app
    key only those booked through that app (a partner never sees what the user wrote
    through Penora or another partner, whatever user id it names); an operator (admin)
    all of the user it names, as it reads their ledger."""

    user_id: str
    app: str | None


def reader_for(principal: Principal, user_id: str | None) -> Reader:
    principal.require_scope("generate")
    if principal.kind == "user":
        if user_id is not None and user_id != principal.user_id:
            raise Forbidden("A user token may read only its own generations", code="wrong_user")
        return Reader(str(principal.user_id), None)
    if not user_id:
        raise Unprocessable("user_id is required for app keys", code="user_id_required")
    if principal.has_scope("admin"):
        return Reader(user_id, None)
    if not principal.app:
        raise Forbidden("Only users and apps read generations", code="not_a_reader")
    return Reader(user_id, principal.app)


def engine_of(request: Request) -> GenerationEngine:
    engine: GenerationEngine = request.app.state.generation
    return engine


async def get_engine(request: Request) -> GenerationEngine:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
    return engine_of(request)


Engine = Annotated[GenerationEngine, Depends(get_engine)]


def state(request: Request) -> Any:
    return request.app.state
