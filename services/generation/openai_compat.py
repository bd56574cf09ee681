"""The OpenAI-compatible face: `POST /v1/generation/chat/completions`, so the official
`openai` package (base_url `<gateway>/v1/generation`, a Ku key or user token as the
API key) works unchanged, streaming included, and every call is charged like the rest:
hold → capture of the words delivered.

For app keys, OpenAI's `user` field names the Ku user who pays. `max_tokens` (or
`max_completion_tokens`) caps the answer in words (a word is at least one token, so
the cap is never looser than OpenAI's); by default the model's limit, at most 1000.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.generation.deps import Engine, caller_for, engine_of
from services.generation.endpoints import (
    ERRORS,
    EventStream,
    checked_model,
    collect_while_connected,
    first_then_rest,
)
from services.generation.service import Outcome
from services.kit.errors import Unprocessable
from services.kit.front import HotRoute, hot
from services.kit.money import milli_to_ku
from services.kit.principal import CurrentPrincipal
from services.kit.schemas import JsonObject, Text, TextGuard

# chat/completions is answered in front of FastAPI's layers (services/kit/front.py):
# every streamed answer's first token waits for its request's path through them.
router = APIRouter(prefix="/v1/generation", tags=["openai-compatible"], route_class=HotRoute)

DEFAULT_MAX_WORDS = 1000


MessageText = Annotated[str, StringConstraints(max_length=20_000), TextGuard]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: (
        Annotated[str, StringConstraints(max_length=20_000), TextGuard] | list[JsonObject] | None
    ) = None


class ChatCompletionIn(BaseModel):
    # OpenAI clients send fields we do not use (n, top_p, stop...): accepted, ignored.
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "mistralai/Mistral-7B-Instruct-v0.3",
                    "messages": [
                        {"role": "system", "content": "You are a concise writing assistant."},
                        {"role": "user", "content": "Suggest a title for a story about tides."},
                    ],
                    "max_tokens": 60,
                    "user": "101902121794505144784",
                }
            ]
        },
    )
    model: Text
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=20_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=20_000)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stream: bool = False
    user: Text | None = Field(None, max_length=128, description="App keys: the Ku user who pays")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))


def _ku(outcome: Outcome) -> dict[str, Any]:
    return {
        "generation_id": outcome.id,
        "words": outcome.words,
        "cost": milli_to_ku(outcome.cost_milli),
        "served_model": outcome.served_model,
        "provider": outcome.provider,
        "offline": outcome.offline,
    }


@router.post(
    "/chat/completions",
    summary="OpenAI-compatible chat completions",
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "id": "chatcmpl-7220a240-d3fc-4c47-a375-6cab593684f0",
                        "object": "chat.completion",
                        "created": 1795678442,
                        "model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "choices": [
                            {
                                "index": 0,
                                "message": {
                                    "role": "assistant",
                                    "content": "Letters from the Tide",
                                },
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 18, "completion_tokens": 6, "total_tokens": 24},
                        "ku": {
                            "generation_id": "7220a240-d3fc-4c47-a375-6cab593684f0",
                            "words": 4,
                            "cost": 0.04,
                            "served_model": "mistralai/Mistral-7B-Instruct-v0.3",
                            "provider": "deepinfra",
                            "offline": False,
                        },
                    }
                }
            }
        },
    },
)
@hot(ChatCompletionIn, engine=engine_of)
async def chat_completions(
    body: ChatCompletionIn, request: Request, principal: CurrentPrincipal, engine: Engine
) -> Any:
    """OpenAI chat completions (streaming too), charged per word delivered."""
    caller = caller_for(principal, request, body.user if principal.kind != "user" else None)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
        for m in body.messages
    ]
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise Unprocessable("A user message with content is required", code="empty_prompt")
    model = engine.catalog.get(body.model)
    max_words = (
        body.max_completion_tokens or body.max_tokens or min(model.max_words, DEFAULT_MAX_WORDS)
    )
    checked_model(engine, model.id, max_words)
    prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    job = await engine.start(
        caller,
        kind="chat",
        model=model,
        messages=messages,
        prompt=prompt,
        max_words=max_words,
        temperature=0.7 if body.temperature is None else body.temperature,
    )
    created = int(time.time())
    completion_id = f"chatcmpl-{job.id}"
    if not body.stream:
        outcome = await collect_while_connected(request, job)
        completion = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": outcome.served_model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": outcome.text},
                    "finish_reason": outcome.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": 0,
                "completion_tokens": outcome.words,
                "total_tokens": outcome.words,
            },
            "ku": _ku(outcome),
        }
        return Response(orjson.dumps(completion), media_type="application/json")
    first, deltas = await first_then_rest(job)

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        served = job.served[0].model.id if job.served else model.id
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": served,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + orjson.dumps(data) + b"\n\n"

    # A text chunk is the same bytes around its text: built once, the text put in
    # between (one small dumps per chunk, not the whole chunk's).
    head, tail = chunk({"content": "\x00"}).split(b'"\\u0000"')

    async def stream() -> AsyncGenerator[bytes, None]:
        # Events that are ready together go out in one write (each write is a send on
        # every hop): the role with the first words, the last chunk with [DONE].
        opening = chunk({"role": "assistant", "content": ""})
        try:
            if first is not None:
                yield opening + head + orjson.dumps(first) + tail
                async for delta in deltas:
                    yield head + orjson.dumps(delta) + tail
            else:
                yield opening
        finally:
            # Closed with this body (the client left): the generation settles now.
            await deltas.aclose()
        outcome = await job.finish_stream()
        if outcome.error is not None and outcome.words == 0:
            yield b"data: " + orjson.dumps(outcome.error.body()) + b"\n\n"
            return
        yield chunk({}, outcome.finish_reason, ku=_ku(outcome)) + b"data: [DONE]\n\n"

    return EventStream(stream())
