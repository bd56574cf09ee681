"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, run in a thread, so
the generation service's real httpx client and SSE parser do the work.

What it does is chosen by the upstream model name and by directives found anywhere in
the messages:

- model `answer` (any model not below): `#words=N` words (default 40), one per SSE chunk;
  `#stall_after=K`: K words, then silence until `release()` (or 120 s);
  `#cut_after=K`: K words, then the connection is closed without `[DONE]`;
  `#delay_ms=N`: N ms between words (slow, not stalled);
- model `always-500` / `always-429`: that status, every time;
- model `always-stall`: headers, then silence;
- `fail_next(status, times)`: the next `times` requests answer `status`;
- `stall_on = "text"`: a request whose messages contain it stalls until cleared.

Every request is recorded in `requests` (path, model, messages, stream).
Paths: `/v1/chat/completions` and `/b/v1/chat/completions` (a second "provider").
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.kit.runner import free_port as _free_port


def directive(messages: list[dict[str, Any]], name: str) -> int | None:
    text = " ".join(str(m.get("content") or "") for m in messages)
    match = re.search(rf"#{name}=(\d+)", text)
    return int(match.group(1)) if match else None


def word(i: int) -> str:
    return f"w{i}"


class FakeProvider:
    def __init__(self, token_delay: float = 0.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[dict[str, Any]] = []
        self.token_delay = token_delay
        self.stall_on: str | None = None
        self._fail: list[int] = []
        self._released = False
        self._lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/b/v1/chat/completions", self.chat, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeProvider:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake provider did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._released = True
        self.server.should_exit = True
        self.thread.join(10)

    # -- control -----------------------------------------------------------------------

    def fail_next(self, status: int, times: int = 1) -> None:
        with self._lock:
            self._fail.extend([status] * times)

    def release(self) -> None:
        self._released = True

    def reset(self) -> None:
        with self._lock:
            self._fail.clear()
        self.stall_on = None
        self._released = False

    def seen(self, marker: str) -> list[dict[str, Any]]:
        """Requests whose messages contain `marker`."""
        return [
            r
            for r in list(self.requests)
            if any(marker in str(m.get("content")) for m in r["messages"])
        ]

    # -- the server ----------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        model = str(body.get("model"))
        messages = list(body.get("messages") or [])
        self.requests.append(
            {
                "path": request.url.path,
                "model": model,
                "messages": messages,
                "stream": bool(body.get("stream")),
                "max_tokens": body.get("max_tokens"),
                "authorization": request.headers.get("authorization"),
                # The client's port: one port for several requests is one kept-alive
                # connection.
                "port": request.client.port if request.client else None,
            }
        )
        with self._lock:
            forced = self._fail.pop(0) if self._fail else None
        if forced is not None:
            return JSONResponse({"error": {"message": f"forced {forced}"}}, status_code=forced)
        if model == "always-500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if model == "always-429":
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429)
        text = " ".join(str(m.get("content")) for m in messages)
        words = directive(messages, "words") or 40
        stall_after = directive(messages, "stall_after")
        cut_after = directive(messages, "cut_after")
        delay_ms = directive(messages, "delay_ms")
        if model == "always-stall" or (self.stall_on and self.stall_on in text):
            stall_after = 0
        if not body.get("stream"):
            content = " ".join(word(i) for i in range(words))
            return JSONResponse(
                {
                    "id": "fake",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        return StreamingResponse(
            self._stream(model, words, stall_after, cut_after, delay_ms),
            media_type="text/event-stream",
        )

    async def _stream(
        self,
        model: str,
        words: int,
        stall_after: int | None,
        cut_after: int | None,
        delay_ms: int | None = None,
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {
                "id": "fake",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + orjson.dumps(data) + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for i in range(words):
            if stall_after is not None and i == stall_after:
                deadline = time.monotonic() + 120
                # Released from the test's thread: a flag polled, not an asyncio.Event.
                while not self._released and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            if cut_after is not None and i == cut_after:
                raise ConnectionResetError("cut")  # uvicorn drops the connection
            yield chunk({"content": word(i) if i == 0 else " " + word(i)})
            if delay_ms or self.token_delay:
                await asyncio.sleep(delay_ms / 1000 if delay_ms else self.token_delay)
        yield chunk({}, "stop")
        yield b"data: [DONE]\n\n"


def main() -> None:
    """`python -m tests.generation.fake_provider PORT [TOKEN_DELAY]`: serve until killed
    (the generation bench runs it as its own process)."""
    import sys

    server = FakeProvider(token_delay=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
    server.port = int(sys.argv[1])
    server.server.config.port = server.port
    server.server.run()


if __name__ == "__main__":
    main()
