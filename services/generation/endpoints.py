from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.generation.catalog import DEFAULT_MODELS, Model
from services.generation.deps import (
    Engine,
    Reader,
    caller_for,
    engine_of,
    reader_for,
)
from services.generation.models import Generation, Story, StoryPart
from services.generation.providers import Message, to_messages
from services.generation.schemas import (
    Estimate,
    EstimateIn,
    GenerationOut,
    HistoryItem,
    HistoryPage,
    ModelList,
    ModelOut,
    StoryIn,
    StoryOut,
    TextIn,
    ToolIn,
    ToolName,
)
from services.generation.service import Caller, GenerationEngine, Job, Outcome
from services.generation.stories import Stories, outline_words
from services.generation.tools import TOOLS
from services.generation.workspace import save, title_from
from services.kit.db import Session
from services.kit.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PaymentRequired,
    ServiceUnavailable,
    Unprocessable,
    UpstreamError,
    UpstreamTimeout,
)
from services.kit.front import HotRoute, hot
from services.kit.money import milli_to_ku
from services.kit.openapi import STANDARD, error_responses
from services.kit.principal import CurrentPrincipal
from services.kit.schemas import UserId

router = APIRouter(prefix="/v1/generation", tags=["generation"])

ERRORS = error_responses(
    {
        401: "Missing or invalid credentials",
        402: (
            "`insufficient_credits`: the maximum cost cannot be held",
            PaymentRequired(available=1.2, required=2.5),
        ),
        403: (
            "Missing scope `generate`, or a user token naming another user",
            [
                Forbidden("Missing scope: generate", code="missing_scope"),
                Forbidden("A user token may act only on its own user", code="wrong_user"),
            ],
        ),
        404: (
            "Unknown model (or generation, or story)",
            [
                NotFound(
                    "Unknown model: gpt-9",
                    code="unknown_model",
                    available=[m["id"] for m in DEFAULT_MODELS],
                ),
                NotFound("No such generation", code="generation_not_found"),
            ],
        ),
        422: (
            "Invalid input: empty prompt, lengths, temperature out of 0-2",
            [
                Unprocessable(
                    "max_words is above this model's limit of 2000",
                    code="too_many_words",
                    max_words=2000,
                ),
                Unprocessable("user_id is required for app keys", code="user_id_required"),
                STANDARD[422],
            ],
        ),
        502: (
            "`provider_error`: every provider failed (nothing charged)",
            UpstreamError("The model provider failed", code="provider_error"),
        ),
        503: (
            "`providers_unavailable`: every provider's breaker is open",
            ServiceUnavailable(
                "Every provider for this model is failing; try again shortly",
                code="providers_unavailable",
            ),
        ),
        504: (
            "`provider_timeout`: the provider stalled (nothing charged)",
            UpstreamTimeout("The model provider did not answer in time", code="provider_timeout"),
        ),
    }
)
DISCONNECT_POLL_SECONDS = 0.25
WORDS_RULE = (
    "words = runs of non-whitespace; cost_milli = ceil(words × multiplier_milli / 100) "
    "(1 Ku per 100 words at ×1)"
)


def model_out(model: Model, engine: GenerationEngine) -> ModelOut:
    provider = engine.router.providers.get(model.provider)
    return ModelOut(
        id=model.id,
        owned_by=model.provider,
        name=model.name,
        multiplier=model.multiplier_milli / 1000,
        price_per_100_words=model.price_milli(100),
        max_words=model.max_words,
        fallback=list(model.fallback),
        offline=bool(provider and provider.offline),
    )


@router.get(
    "/models",
    summary="The model catalog, with prices",
    response_model=ModelList,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "object": "list",
                        "data": [
                            {
                                "id": "mistralai/Mistral-7B-Instruct-v0.3",
                                "object": "model",
                                "created": 0,
                                "owned_by": "deepinfra",
                                "name": "Mistral 7B Instruct",
                                "multiplier": 1.0,
                                "price_per_100_words": 1,
                                "max_words": 4000,
                                "fallback": ["meta-llama/Meta-Llama-3.1-8B-Instruct"],
                                "offline": False,
                            },
                            {
                                "id": "meta-llama/Meta-Llama-3.1-8B-Instruct",
                                "object": "model",
                                "created": 0,
                                "owned_by": "deepinfra",
                                "name": "Llama 3.1 8B",
                                "multiplier": 1.0,
                                "price_per_100_words": 1,
                                "max_words": 4000,
                                "fallback": ["mistralai/Mistral-7B-Instruct-v0.3"],
                                "offline": False,
                            },
                        ],
                    }
                }
            }
        },
    },
)
async def list_models(engine: Engine, principal: CurrentPrincipal) -> ModelList:
    """The model catalog with prices, in OpenAI's list shape (the `openai` package reads it)."""
    principal.require_scope("generate")
    return ModelList(data=[model_out(m, engine) for m in engine.catalog.models.values()])


def checked_model(engine: GenerationEngine, model_id: str | None, max_words: int) -> Model:
    model = engine.catalog.get(model_id)
    if max_words > model.max_words:
        raise Unprocessable(
            f"max_words is above this model's limit of {model.max_words}",
            code="too_many_words",
            max_words=model.max_words,
        )
    return model


@router.post(
    "/estimate",
    summary="The most a generation can cost",
    response_model=Estimate,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "max_words": 200,
                        "words_rule": "words = runs of non-whitespace; 1 Ku per 100 words at ×1",
                        "cost": 2,
                        "max_cost": 2,
                    }
                }
            }
        },
    },
)
async def estimate(body: EstimateIn, engine: Engine, principal: CurrentPrincipal) -> Estimate:
    """The most a generation (or a story of `chapters`) can cost, before anything runs."""
    principal.require_scope("generate")
    model = checked_model(engine, body.model, body.max_words)
    parts = 1
    words = body.max_words
    if body.chapters:
        parts = body.chapters
        extra = engine.catalog.max_price_milli(model, outline_words(body.chapters))
        cost_extra = model.price_milli(outline_words(body.chapters))
    else:
        extra = cost_extra = 0
    return Estimate(
        model=model.id,
        max_words=words,
        words_rule=WORDS_RULE,
        cost=model.price_milli(words) * parts + cost_extra,
        max_cost=engine.catalog.max_price_milli(model, words) * parts + extra,
    )


def result_body(outcome: Outcome, **extra: Any) -> GenerationOut:
    return GenerationOut(
        id=outcome.id,
        status=outcome.status,
        model=outcome.model,
        served_model=outcome.served_model,
        provider=outcome.provider,
        offline=outcome.offline,
        text=outcome.text,
        words=outcome.words,
        cost=outcome.cost_milli,
        held=outcome.held_milli,
        finish_reason=outcome.finish_reason,
        latency_ms=outcome.latency_ms,
        **extra,
    )


class EventStream(Response):
    """A `text/event-stream` answer, written as its body generator yields.

    Not starlette's StreamingResponse, which runs the body and a disconnect listener
    as two tasks of an anyio task group and, at the end, cancels the group's scope
    (whose reason string formats the current task: a coroutine repr with a source
    lookup), for every stream. Here the body runs in the request's own task and one
    small task waits for the client to leave: it cancels the request's task, as the
    task group did, so a client that leaves while the provider is silent is noticed
    at once. The body generator is closed as soon as the answer ends either way, so
    a generation left mid-stream settles at once on what was delivered."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None]) -> None:
        self.events = body
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        body = self.events
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()  # the client left: the answer ends here, not the server
        finally:
            watcher.cancel()
            await body.aclose()


def sse(event: str, data: Any) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


async def first_then_rest(job: Job) -> tuple[str | None, AsyncGenerator[str, None]]:
    """Wait for the first delta before answering, so a provider that fails before
    saying anything is a plain 502/504 (and nothing is charged)."""
    deltas = job.stream()
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        outcome = await job.finish_stream()
        if outcome.error is not None:
            raise outcome.error from None
        return None, deltas
    return first, deltas


async def collect_while_connected(request: Request, job: Job) -> Outcome:
    """`job.collect()`, abandoned (and the hold released) if the client leaves first: a
    client that gave up (or a gateway that timed out) never receives the text, so it
    must not pay for it."""
    task = asyncio.create_task(job.collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise UpstreamError("The client went away", code="client_disconnected")


async def run(
    request: Request,
    engine: GenerationEngine,
    caller: Caller,
    *,
    kind: str,
    model: Model,
    messages: list[Message],
    prompt: str,
    max_words: int,
    temperature: float,
    stream: bool,
    save_as: tuple[str, str] | None,
) -> Any:
    job = await engine.start(
        caller,
        kind=kind,
        model=model,
        messages=messages,
        prompt=prompt,
        max_words=max_words,
        temperature=temperature,
    )
    if not stream:
        outcome = await collect_while_connected(request, job)
        return await saved(request, engine, caller, outcome, save_as)
    first, deltas = await first_then_rest(job)

    async def body() -> AsyncGenerator[bytes, None]:
        start = sse("start", {"id": job.id, "model": model.id})
        try:
            if first is None:
                yield start
            else:
                # One write for both: each write is a send on every hop.
                yield start + sse("delta", {"text": first})
                async for delta in deltas:
                    yield sse("delta", {"text": delta})
        finally:
            # Closed with this body (the client left): the generation settles now.
            await deltas.aclose()
        outcome = await job.finish_stream()
        if outcome.error is not None and outcome.words == 0:
            yield sse("error", outcome.error.body())
            return
        done = await saved(request, engine, caller, outcome, save_as)
        yield sse("done", done.model_dump(mode="json"))

    return EventStream(body())


async def saved(
    request: Request,
    engine: GenerationEngine,
    caller: Caller,
    outcome: Outcome,
    save_as: tuple[str, str] | None,
) -> GenerationOut:
    if save_as is None or not outcome.text:
        return result_body(outcome)
    title, project_type = save_as
    code, error = await save(
        request.app.state.service_client,
        caller,
        title=title,
        content=outcome.text,
        project_type=project_type,
        metadata={
            "generation_id": outcome.id,
            "model": outcome.served_model,
            "words": outcome.words,
            "cost": milli_to_ku(outcome.cost_milli),
        },
        key=f"save:{outcome.id}",
    )
    if code is not None:
        await engine.set_project(outcome.id, code)
    return result_body(outcome, project_code=code, save_error=error)


@hot(TextIn, engine=engine_of)
async def generate_text(
    body: TextIn, request: Request, principal: CurrentPrincipal, engine: Engine
) -> Any:
    """Generate from one prompt; `stream: true` answers SSE (`delta` events, then `done`)."""
    caller = caller_for(principal, request, body.user_id)
    model = checked_model(engine, body.model, body.max_words)
    result = await run(
        request,
        engine,
        caller,
        kind="text",
        model=model,
        messages=to_messages(body.prompt, body.system),
        prompt=body.prompt,
        max_words=body.max_words,
        temperature=body.temperature,
        stream=body.stream,
        save_as=(body.title or title_from(body.prompt), "text") if body.save else None,
    )
    if isinstance(result, Response):
        return result
    # A Response, not the model: the route answers in front of FastAPI (HotRoute).
    return Response(orjson.dumps(result.model_dump(mode="json")), media_type="application/json")


# Added, not decorated: the route is a HotRoute (services/kit/front.py), so a well-formed
# request goes from the kit middleware straight to it, as chat/completions does.
router.add_api_route(
    "/text",
    generate_text,
    methods=["POST"],
    summary="Generate text from a prompt",
    response_model=GenerationOut,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "id": "94f23e41-a1e2-4197-bb10-d4173a603a9f",
                        "status": "completed",
                        "model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "served_model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "provider": "deepinfra",
                        "offline": False,
                        "text": "The tram groaned up the hill toward Alfama as Inês folded the"
                        " letter again. Nobody in Lisbon wrote letters any more.",
                        "words": 21,
                        "cost": 0.21,
                        "held": 2,
                        "finish_reason": "stop",
                        "latency_ms": 2140,
                        "project_code": None,
                        "save_error": None,
                    }
                }
            }
        },
    },
    route_class_override=HotRoute,
)


@router.post(
    "/tools/{tool}",
    summary="Run a writing tool (complete, rewrite, describe, brainstorm)",
    response_model=GenerationOut,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "id": "f1515942-4cf7-4a06-8833-2db6b565fcc7",
                        "status": "completed",
                        "model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "served_model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "provider": "deepinfra",
                        "offline": False,
                        "text": "1. Salt & Crumb. 2. The Tide Loaf. 3. Harbour Rise."
                        " 4. Gull's Knead. 5. Low Tide Bakehouse.",
                        "words": 18,
                        "cost": 0.18,
                        "held": 1.2,
                        "finish_reason": "stop",
                        "latency_ms": 9,
                        "project_code": None,
                        "save_error": None,
                    }
                }
            }
        },
    },
)
async def use_tool(
    tool: Annotated[ToolName, Path(description="complete | rewrite | describe | brainstorm")],
    body: ToolIn,
    request: Request,
    principal: CurrentPrincipal,
    engine: Engine,
) -> Any:
    """A writing tool: Complete Write, Advanced Rewrite, Rich Describe or Smart Brainstorm."""
    caller = caller_for(principal, request, body.user_id)
    model = checked_model(engine, body.model, body.max_words)
    spec = TOOLS[tool]
    messages = spec.messages(body)
    return await run(
        request,
        engine,
        caller,
        kind=f"tool:{tool}",
        model=model,
        messages=messages,
        prompt=messages[-1]["content"],
        max_words=body.max_words,
        temperature=body.temperature,
        stream=body.stream,
        save_as=(spec.title, tool) if body.save else None,
    )


def history_item(row: Generation) -> HistoryItem:
    return HistoryItem(
        id=str(row.id),
        kind=row.kind,
        app=row.app,
        status=row.status,
        model=row.model,
        served_model=row.served_model,
        provider=row.provider,
        offline=row.offline,
        prompt=row.prompt,
        output=row.output,
        words=row.words,
        cost=row.cost_milli,
        latency_ms=row.latency_ms,
        project_code=row.project_code,
        created_at=row.created_at,
    )


def _cursor(row: Generation) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _parse_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        at, _, gid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(at), uuid.UUID(gid)
    except ValueError:
        raise BadRequest("Invalid cursor", code="invalid_cursor") from None


@router.get(
    "/history",
    summary="A user's generations, newest first",
    response_model=HistoryPage,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "items": [
                            {
                                "id": "f1515942-4cf7-4a06-8833-2db6b565fcc7",
                                "kind": "tool:brainstorm",
                                "app": "penora",
                                "status": "completed",
                                "model": "mistralai/Mistral-7B-Instruct-v0.3",
                                "served_model": "mistralai/Mistral-7B-Instruct-v0.3",
                                "provider": "deepinfra",
                                "offline": False,
                                "prompt": "Brainstorm 5 names for a seaside bakery.",
                                "output": "1. Salt & Crumb. 2. The Tide Loaf. 3. Harbour Rise."
                                " 4. Gull's Knead. 5. Low Tide Bakehouse.",
                                "words": 18,
                                "cost": 0.18,
                                "latency_ms": 9,
                                "project_code": "K7Q2ZD",
                                "created_at": "2026-11-26T10:34:02Z",
                            }
                        ],
                        "next_cursor": "MjAyNi0xMS0yNlQxMDozNDowMlo=",
                    }
                }
            }
        },
    },
)
async def history(
    principal: CurrentPrincipal,
    session: Session,
    user_id: UserId | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> HistoryPage:
    """A user's generations, newest first (user tokens: their own only)."""
    reader = reader_for(principal, user_id)
    query = select(Generation).where(Generation.user_id == reader.user_id)
    if reader.app is not None:
        query = query.where(Generation.app == reader.app)
    if cursor:
        at, gid = _parse_cursor(cursor)
        query = query.where(
            or_(
                Generation.created_at < at,
                and_(Generation.created_at == at, Generation.id < gid),
            )
        )
    rows = (
        await session.scalars(
            query.order_by(Generation.created_at.desc(), Generation.id.desc()).limit(limit + 1)
        )
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return HistoryPage(
        items=[history_item(r) for r in rows],
        next_cursor=_cursor(rows[-1]) if more and rows else None,
    )


@router.get(
    "/generations/{generation_id}",
    summary="One generation",
    response_model=HistoryItem,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "id": "f1515942-4cf7-4a06-8833-2db6b565fcc7",
                        "kind": "tool:brainstorm",
                        "app": "penora",
                        "status": "completed",
                        "model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "served_model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "provider": "deepinfra",
                        "offline": False,
                        "prompt": "Brainstorm 5 names for a seaside bakery.",
                        "output": "1. Salt & Crumb. 2. The Tide Loaf. 3. Harbour Rise."
                        " 4. Gull's Knead. 5. Low Tide Bakehouse.",
                        "words": 18,
                        "cost": 0.18,
                        "latency_ms": 9,
                        "project_code": "K7Q2ZD",
                        "created_at": "2026-11-26T10:34:02Z",
                    }
                }
            }
        },
    },
)
async def get_generation(
    generation_id: str,
    principal: CurrentPrincipal,
    session: Session,
    user_id: UserId | None = None,
) -> HistoryItem:
    """One generation (another user's is 404: the same answer as none)."""
    reader = reader_for(principal, user_id)
    try:
        gid = uuid.UUID(generation_id)
    except ValueError:
        raise NotFound("No such generation", code="generation_not_found") from None
    query = select(Generation).where(Generation.id == gid, Generation.user_id == reader.user_id)
    if reader.app is not None:
        query = query.where(Generation.app == reader.app)
    row = await session.scalar(query)
    if row is None:
        raise NotFound("No such generation", code="generation_not_found")
    return history_item(row)


@router.post(
    "/story",
    summary="Start writing a story, chapter by chapter",
    status_code=202,
    response_model=StoryOut,
    responses=ERRORS,
)
async def create_story(
    body: StoryIn, request: Request, principal: CurrentPrincipal, session: Session
) -> dict[str, Any]:
    """Write a story: an outline, then chapters, each charged; progress on `/v1/events`."""
    caller = caller_for(principal, request, body.user_id)
    stories: Stories = request.app.state.stories
    engine: GenerationEngine = request.app.state.generation
    model = checked_model(engine, body.model, body.words_per_chapter)
    story_id = await stories.submit(
        caller,
        model=model,
        premise=body.premise,
        title=body.title,
        chapters=body.chapters,
        words_per_chapter=body.words_per_chapter,
        temperature=body.temperature,
    )
    return await story_view(session, stories, story_id, Reader(caller.user_id, None))


async def story_view(
    session: AsyncSession, stories: Stories, story_id: uuid.UUID, reader: Reader
) -> dict[str, Any]:
    query = select(Story).where(Story.id == story_id, Story.user_id == reader.user_id)
    if reader.app is not None:
        query = query.where(Story.app == reader.app)
    story = await session.scalar(query)
    if story is None:
        raise NotFound("No such story", code="story_not_found")
    parts = (
        await session.scalars(
            select(StoryPart).where(StoryPart.story_id == story_id).order_by(StoryPart.n)
        )
    ).all()
    return stories.view(story, list(parts))


@router.get(
    "/story/{story_id}",
    summary="A story's progress and chapters",
    response_model=StoryOut,
    responses=ERRORS,
)
async def get_story(
    story_id: str,
    request: Request,
    principal: CurrentPrincipal,
    session: Session,
    user_id: UserId | None = None,
) -> dict[str, Any]:
    """A story, its parts and what they cost so far (another user's is 404)."""
    reader = reader_for(principal, user_id)
    try:
        sid = uuid.UUID(story_id)
    except ValueError:
        raise NotFound("No such story", code="story_not_found") from None
    return await story_view(session, request.app.state.stories, sid, reader)
