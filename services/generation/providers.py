"""Providers behind one interface, and the router that picks one.

`Provider.stream(upstream_model, messages, max_tokens, temperature)` yields text
deltas. Two implementations:

- `OpenAICompatible`: `POST {base_url}/chat/completions` with `stream: true` over
  the kit's keep-alive client (`services.kit.pool`), parsing the Server-Sent Events
  (DeepInfra, vLLM, Ollama, llama.cpp server and OpenRouter all speak it). A read
  that waits longer than the timeout (60 s, seed 003) is a stall.
- `Offline`: deterministic text made locally, for development only; every result
  served by it says `offline: true`, and production refuses to start with it.

`Router.stream()` tries the model, then its fallbacks: each attempt retries 429/5xx
and connection errors with backoff, skips a provider whose breaker is open, and
never retries once a delta has been delivered (the caller got text; a retry would
repeat it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis

from services.generation.catalog import OFFLINE, Catalog, Model
from services.generation.config import GenerationSettings
from services.kit.breaker import CircuitBreaker
from services.kit.errors import ServiceUnavailable, UpstreamError, UpstreamTimeout
from services.kit.pool import Pool, UpstreamClosed

log = logging.getLogger("ku.generation.providers")

Message = dict[str, str]

SUCCESS_EVERY = 1.0
# A provider's error answer is read (so its connection can be reused) up to this size.
ERROR_BODY_LIMIT = 64 * 1024


class ProviderError(Exception):
    """One failed attempt. `retryable`: worth trying the same provider again."""

    def __init__(self, message: str, *, retryable: bool, timeout: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout


class Provider(Protocol):
    name: str
    offline: bool

    def stream(
        self, model: str, messages: Sequence[Message], *, max_tokens: int, temperature: float
    ) -> AsyncGenerator[str, None]: ...

    async def aclose(self) -> None: ...


# How long an idle connection to a provider is kept for the next generation. The
# kit's pool defaults to 4 s, under the services' own uvicorn keep-alive (5 s); a
# provider is usually remote and over TLS, where a new connection costs the next user's
# time to first token a TCP and a TLS handshake. An idle connection keeps being read,
# so a server that closes it first (vLLM or llama.cpp after ~5 s) is seen and the
# connection dropped, not reused. 50 s stays under the common 60 s idle timeout of load
# balancers in front of providers, so the two do not close and reuse at the same moment.
# Per provider: `idle_seconds` in KU_GENERATION_PROVIDERS.
PROVIDER_IDLE_SECONDS = 50.0


class OpenAICompatible:
    """One OpenAI-compatible provider over the kit's lean keep-alive HTTP/1.1 client
    (`services.kit.pool`: one asyncio protocol per connection, httptools parsing the
    response and its chunked encoding).

    Not httpx: a streamed answer is read one SSE event per token, and measured on 64
    streams of 200 words each, httpx's read path (h11, httpcore and httpx's line
    decoding, in Python) cost ~125 µs of CPU per token. Not aiohttp either (since stop
    12): its read path per piece (StreamReader, a timer reset per read, the chain of
    futures) and the pacing sleep's own task wake-up cost more than the pool's
    (docs/generation.md, "Where a streamed token's time goes")."""

    offline = False

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str,
        *,
        timeout_seconds: float,
        pace_seconds: float = 0.0,
        idle_seconds: float = PROVIDER_IDLE_SECONDS,
    ) -> None:
        self.name = name
        # After each piece of text, the socket is left unread this long (the stream's
        # flush interval): tokens that arrive meanwhile wait in the kernel and come in
        # one read, parsed in one step. Read one by one, every token costs a receive, a
        # wake-up of this generator chain and its consumer's write.
        self.pace_seconds = pace_seconds
        self.base_url = base_url.rstrip("/")
        self._headers = [(b"content-type", b"application/json")]
        if api_key:
            self._headers.append((b"authorization", f"Bearer {api_key}".encode()))
        # A stall is a read that waits longer than the timeout; a long answer that
        # keeps streaming is not one (no total limit).
        self.timeout_seconds = timeout_seconds
        self.idle_seconds = idle_seconds
        self._pool: Pool | None = None

    def _client(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(
                self.base_url,
                connect_timeout=min(10.0, self.timeout_seconds),
                idle_seconds=self.idle_seconds,
            )
        return self._pool

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()

    async def stream(
        self, model: str, messages: Sequence[Message], *, max_tokens: int, temperature: float
    ) -> AsyncGenerator[str, None]:
        """The answer's text: one piece per read from the provider (every delta that
        arrived together, joined), so a burst costs one step, not one per token."""
        body = orjson.dumps(
            {
                "model": model,
                "messages": list(messages),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "stream": True,
            }
        )
        timeout = self.timeout_seconds
        try:
            response = await self._client().request(
                "POST", b"/chat/completions", self._headers, body, read_timeout=timeout
            )
        except TimeoutError:
            raise ProviderError(f"{self.name} timed out", retryable=False, timeout=True) from None
        except OSError as exc:
            raise ProviderError(f"{self.name} unreachable: {exc}", retryable=True) from None
        reusable = False
        try:
            if response.status != 200:
                await response.read(limit=ERROR_BODY_LIMIT)
                reusable = True
                retryable = response.status == 429 or response.status >= 500
                raise ProviderError(f"{self.name} answered {response.status}", retryable=retryable)
            events = SSEParser()
            finished = done = False
            pace = self.pace_seconds
            deltas = self._deltas
            # A body with neither a length nor chunks ends when the server closes.
            until_closed = (
                response.content_length is None
                and b"chunked" not in (response.header(b"transfer-encoding") or b"").lower()
            )
            while True:
                try:
                    data = await response.read_any()
                except UpstreamClosed:
                    if not until_closed:
                        raise
                    data = None
                if data is None:
                    break
                texts: list[str] = []
                for event in events.feed(data):
                    if event == b"[DONE]":
                        finished = done = True
                        break
                    finished = deltas(event, texts) or finished
                if done:
                    # The body's end usually came in the same read: the connection
                    # is kept for the next stream.
                    reusable = response.complete
                    if texts:
                        yield "".join(texts)
                    break
                if texts:
                    if pace:
                        # Paused before the consumer gets the text: its write to the
                        # client runs during the interval, not before it.
                        response.hold(pace)
                    yield "".join(texts)
            if not done:
                reusable = not until_closed
                # The stream ended: an event the provider did not close with a blank
                # line still counts.
                texts = []
                for event in events.end():
                    if event == b"[DONE]":
                        finished = True
                    else:
                        finished = deltas(event, texts) or finished
                if texts:
                    yield "".join(texts)
            if not finished:
                raise ProviderError(f"{self.name} cut the stream", retryable=True)
        except TimeoutError:
            reusable = False
            raise ProviderError(f"{self.name} timed out", retryable=False, timeout=True) from None
        except OSError as exc:
            reusable = False
            raise ProviderError(f"{self.name} unreachable: {exc}", retryable=True) from None
        finally:
            if reusable:
                response.release()
            else:
                response.close()

    def _deltas(self, event: bytes, texts: list[str]) -> bool:
        """Add one chunk's text to `texts`; True when it says the answer is finished."""
        try:
            chunk = orjson.loads(event)
        except orjson.JSONDecodeError:
            raise ProviderError(f"{self.name} sent invalid JSON", retryable=True) from None
        if not isinstance(chunk, dict):
            raise ProviderError(f"{self.name} sent an unexpected chunk", retryable=True)
        if "error" in chunk:
            raise ProviderError(f"{self.name}: {chunk['error']}", retryable=True)
        finished = False
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                texts.append(text)
            if choice.get("finish_reason"):
                finished = True
        return finished


class SSEParser:
    """Server-Sent Events from raw bytes, as they arrive: `feed()` returns the `data`
    of every event completed by this read (multi-line data joined with newlines;
    comments and other fields skipped; CRLF, CR and LF line ends).

    The bytes are cut at blank lines (line ends made LF first) and what follows the
    last one waits for the next read; an event that is one `data: ` line, what every
    OpenAI-compatible server sends, is taken as it is, without splitting it into lines
    (this parser runs for every token of every stream)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        keep = b""
        if b"\r" in buffer:
            # A lone CR at the end may be the first half of a CRLF: keep it back.
            if buffer.endswith(b"\r"):
                buffer, keep = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop() + keep
        out: list[bytes] = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])
                continue
            data = [
                line[6:] if line.startswith(b"data: ") else line[5:]
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                out.append(b"\n".join(data))
        return out

    def end(self) -> list[bytes]:
        """At the end of the stream: the event still open, if any."""
        out = self.feed(b"\n\n") if self._buffer else []
        self._buffer = b""
        return out


_OFFLINE_WORDS = (
    "the quiet river carried lanterns past the old mill while a story slowly found "
    "its voice and every chapter opened another door into the night"
).split()


class Offline:
    """Deterministic local text for development: never a real model's output."""

    name = OFFLINE
    offline = True

    async def aclose(self) -> None:
        return None

    async def stream(
        self, model: str, messages: Sequence[Message], *, max_tokens: int, temperature: float
    ) -> AsyncGenerator[str, None]:
        seed = hashlib.sha256(orjson.dumps([model, list(messages)])).digest()
        start = seed[0] % len(_OFFLINE_WORDS)
        words = max(1, min(max_tokens * 3 // 4, 400))
        for i in range(words):
            yield ("" if i == 0 else " ") + _OFFLINE_WORDS[(start + i) % len(_OFFLINE_WORDS)]
            if i % 16 == 15:
                await asyncio.sleep(0)


@dataclass(frozen=True)
class Served:
    """Who is answering: known once the first delta arrived."""

    model: Model
    provider: str
    offline: bool


def build_providers(settings: GenerationSettings) -> dict[str, Provider]:
    providers: dict[str, Provider] = {OFFLINE: Offline()}
    for name, raw in settings.generation_providers.items():
        if name == OFFLINE:
            continue
        idle = raw.get("idle_seconds", PROVIDER_IDLE_SECONDS)
        if isinstance(idle, bool) or not isinstance(idle, int | float) or not 0 <= idle <= 3600:
            raise ValueError(
                f"KU_GENERATION_PROVIDERS: {name}'s idle_seconds must be a number of seconds"
                f" from 0 to 3600, not {idle!r}"
            )
        providers[name] = OpenAICompatible(
            name,
            str(raw.get("base_url") or ""),
            str(raw.get("api_key") or settings.generation_api_key),
            timeout_seconds=settings.generation_timeout_seconds,
            pace_seconds=settings.generation_stream_flush_ms / 1000,
            idle_seconds=float(idle),
        )
    return providers


def check_production(settings: GenerationSettings, catalog: Catalog) -> None:
    """Production serves real models only: say exactly what is missing, or pass."""
    if settings.environment != "production":
        return
    if settings.generation_offline:
        raise RuntimeError(
            "KU_GENERATION_OFFLINE=true in production: the offline provider is for "
            "development only; configure a real provider (KU_GENERATION_PROVIDERS, "
            "KU_GENERATION_API_KEY)"
        )
    for name in sorted(catalog.providers()):
        raw = settings.generation_providers.get(name)
        if name == OFFLINE or raw is None:
            raise RuntimeError(
                f"model catalog uses provider {name!r}, which is not a configured "
                "OpenAI-compatible provider (KU_GENERATION_PROVIDERS)"
            )
        if not raw.get("base_url"):
            raise RuntimeError(f"provider {name!r} has no base_url (KU_GENERATION_PROVIDERS)")
        needs_key = raw.get("api_key_required", True)
        if needs_key and not (raw.get("api_key") or settings.generation_api_key):
            raise RuntimeError(
                f"provider {name!r} has no API key: set KU_GENERATION_API_KEY "
                '(or "api_key_required": false for a keyless local server)'
            )


class Router:
    def __init__(
        self,
        settings: GenerationSettings,
        catalog: Catalog,
        providers: dict[str, Provider],
        redis: Redis,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.providers = providers
        self.breakers = {
            name: CircuitBreaker(
                redis,
                f"generation:{name}",
                prefix=settings.bus_prefix,
                failure_threshold=settings.generation_breaker_failures,
                open_seconds=settings.generation_breaker_open_seconds,
                # Off the time to first token: a breaker seen closed is trusted for 1 s.
                closed_cache_seconds=1.0,
            )
            for name in providers
        }
        # When this process last told a provider's breaker of a success (monotonic), or
        # 0 after a failure: a success is recorded at most once a second per provider
        # while nothing failed (each is a Redis round trip per generation otherwise; the
        # same second of staleness the breaker's closed cache already accepts).
        self._succeeded: dict[str, float] = {}

    async def stream(
        self,
        model: Model,
        messages: Sequence[Message],
        *,
        max_words: int,
        temperature: float,
        served: list[Served],
    ) -> AsyncGenerator[str, None]:
        """Deltas from the first candidate that answers; `served` gets who it was."""
        # Tokens are ~0.75 words in English; a margin so a long answer is not cut short
        # by the provider before `max_words` (the caller cuts at exactly max_words).
        max_tokens = max_words * 2 + 16
        last: ProviderError | None = None
        skipped = 0
        for candidate in self.catalog.chain(model):
            provider = self.providers.get(candidate.provider)
            if provider is None:
                last = ProviderError(
                    f"provider {candidate.provider} is not configured", retryable=False
                )
                continue
            breaker = self.breakers[candidate.provider]
            for attempt in range(self.settings.generation_retries + 1):
                if not await breaker.allow():
                    skipped += 1
                    break
                delivered = False
                deltas = provider.stream(
                    candidate.upstream, messages, max_tokens=max_tokens, temperature=temperature
                )
                try:
                    async for delta in deltas:
                        if not delivered:
                            delivered = True
                            served.append(Served(candidate, provider.name, provider.offline))
                        yield delta
                    if not delivered:
                        served.append(Served(candidate, provider.name, provider.offline))
                    now = time.monotonic()
                    if now - self._succeeded.get(candidate.provider, 0.0) >= SUCCESS_EVERY:
                        self._succeeded[candidate.provider] = now
                        await breaker.record_success()
                    return
                except ProviderError as exc:
                    self._succeeded[candidate.provider] = 0.0
                    await breaker.record_failure()
                    log.warning("model %s via %s: %s", candidate.id, provider.name, exc)
                    if delivered:
                        raise  # text was delivered: never restart it elsewhere
                    last = exc
                    if not exc.retryable or attempt >= self.settings.generation_retries:
                        break
                    delay = self.settings.generation_backoff_seconds * 2**attempt
                    await asyncio.sleep(delay * (0.5 + random.random()))
                finally:
                    # A consumer that stopped early (cut at max_words, or gone) leaves
                    # the provider's stream at a yield: its connection closes now, not
                    # when the generator is collected.
                    await deltas.aclose()
        if last is None and skipped:
            raise ServiceUnavailable(
                "Every provider for this model is failing; try again shortly",
                code="providers_unavailable",
            )
        if last is not None and last.timeout:
            raise UpstreamTimeout(
                "The model provider did not answer in time", code="provider_timeout"
            )
        raise UpstreamError("The model provider failed", code="provider_error")

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()


def to_messages(prompt: str, system: str | None = None) -> list[Message]:
    out: list[Message] = []
    if system:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": prompt})
    return out


def describe(provider: Any) -> str:
    return getattr(provider, "name", "?")
